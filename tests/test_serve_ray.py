"""The server as a Ray Serve deployment (``latentdiff serve --ray`` calls :func:`latentdiff.serve.ray_app.deploy`):
a local Ray instance on the CPU, started and stopped by this module, one replica with the embedded model, and real
requests through Ray's HTTP proxy with the webuiapi client."""

from __future__ import annotations

import socket

import numpy as np
import pytest

try:
    import ray
    from ray import serve
except ImportError as e:  # the ray extra is optional
    print(f"test_serve_ray: skipped, ray cannot be imported ({e})")
    pytest.skip(f"ray cannot be imported ({e})", allow_module_level=True)
webuiapi = pytest.importorskip("webuiapi", reason="webuiapi (dev extra) is not installed")

from latentdiff.serve.service import ServeSettings  # noqa: E402


@pytest.fixture(scope="module")
def ray_server():
    from latentdiff.serve.ray_app import deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        deploy(ServeSettings(ckpts=["default"], device="cpu"), host="127.0.0.1", port=port, num_replicas=1,
               num_cpus=1)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_requests_through_ray_serve(ray_server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=ray_server)
    assert [m["model_name"] for m in api.get_sd_models()] == ["default"]
    r = api.txt2img(prompt="a photo of a cat", seed=21, batch_size=2, width=32, height=32, steps=3,
                    do_not_save_grid=True)
    assert r.info["all_seeds"] == [21, 22] and len(r.images) == 2
    assert r.images[1].info["parameters"].startswith("a photo of a cat\nSteps: 3, Sampler: Euler a, CFG scale: 7, "
                                                     "Seed: 22, Size: 32x32")
    again = api.txt2img(prompt="a photo of a cat", seed=22, width=32, height=32, steps=3)
    a, b = np.asarray(r.images[1], dtype=int), np.asarray(again.image, dtype=int)
    assert np.abs(a - b).max() <= 1  # the same image (a batch of 2 vs 1: float rounding, see test_serve.py)
    bad = api.session.post(f"{api.baseurl}/txt2img", json={"steps": "many"})
    assert bad.status_code == 422  # the app's own answers, through Ray's proxy
    assert api.session.get(f"http://127.0.0.1:{ray_server}/health").json()["status"] == "ok"
