"""The HTTP server against a real AUTOMATIC1111 client (the ``webuiapi`` package from PyPI): a uvicorn server in a
thread on a loopback port with the embedded models and the tiny test model; images are checked against the
pipeline's own ``generate`` (the same pixels), batching by the worker's counters (``/health``); a fuzz corpus of
bad requests. The command line and Ray Serve: tests/test_serve_cli.py, tests/test_serve_ray.py."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
webuiapi = pytest.importorskip("webuiapi", reason="webuiapi (dev extra) is not installed")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from latentdiff.io.images import to_pil  # noqa: E402
from latentdiff.serve.app import create_app  # noqa: E402
from latentdiff.serve.schemas import Limits  # noqa: E402
from latentdiff.serve.service import ServeSettings, Service  # noqa: E402

PROMPT = "a photo of a cat"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread serving ``create_app(service)`` on 127.0.0.1."""

    def __init__(self, service: Service):
        import uvicorn

        self.service = service
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, **kwargs) -> webuiapi.WebUIApi:
        return webuiapi.WebUIApi(host="127.0.0.1", port=self.port, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop()


@pytest.fixture(scope="module")
def server(tiny_ldm_file):
    settings = ServeSettings(ckpts=["default", str(tiny_ldm_file), "default-vq"], device="cpu", max_batch=4,
                             batch_window_ms=20,
                             limits=Limits(max_steps=150, max_queue=8, max_body_bytes=2**20, max_pixels=512 * 512))
    srv = Server(Service.start(settings))
    yield srv
    srv.stop()


def health(srv) -> dict:
    return httpx.get(f"{srv.url}/health").json()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def alone(srv, prompt, seed, n=1, **kwargs):
    """What the pipeline itself makes: PIL images of one generate call."""
    pipe = srv.service.models.current.pipe
    images, _ = pipe.generate([prompt] * n, seeds=[seed + i for i in range(n)], **kwargs)
    return to_pil(images)


def test_txt2img_with_webuiapi(server):
    api = server.api()
    r = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=7, batch_size=2, width=32, height=32, steps=6,
                    cfg_scale=4, sampler_name="DPM++ 2M")
    assert len(r.images) == 3 and r.info["index_of_first_image"] == 1  # AUTOMATIC1111's grid first
    assert r.info["all_seeds"] == [7, 8] and r.info["seed"] == 7 and r.info["sampler_name"] == "DPM++ 2M"
    assert (r.info["width"], r.info["height"], r.info["steps"], r.info["cfg_scale"]) == (32, 32, 6, 4)
    assert r.info["sd_model_name"] == "default" and r.info["all_prompts"] == [PROMPT] * 2
    assert r.parameters["prompt"] == PROMPT and r.parameters["seed"] == 7
    expected = alone(server, PROMPT, 7, n=2, negative_prompt="blurry", steps=6, scale=4, sampler="dpmpp_2m",
                     height=32, width=32)
    for i, image in enumerate(r.images[1:]):
        assert image.format == "PNG" and image.size == (32, 32)
        text = image.info["parameters"]
        assert text == r.info["infotexts"][i + 1]
        assert text.startswith(f"{PROMPT}\nNegative prompt: blurry\nSteps: 6, Sampler: DPM++ 2M, CFG scale: 4, "
                               f"Seed: {7 + i}, Size: 32x32")
        assert np.array_equal(pixels(image), pixels(expected[i]))


@pytest.mark.parametrize("fields", [{"sampler_name": "DPM++ 2M Karras"},
                                    {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}])
def test_dpmpp_2m_karras_both_ways_of_asking(server, fields):
    """AUTOMATIC1111 names it "DPM++ 2M Karras" (before 1.9) or "DPM++ 2M" with the scheduler "Karras"; both give
    DPM-Solver++(2M) on Karras sigmas, which differs from the plain sampler's images."""
    r = server.api().txt2img(prompt=PROMPT, seed=5, width=32, height=32, steps=5, cfg_scale=3, **fields)
    assert "Sampler: DPM++ 2M Karras," in r.image.info["parameters"]
    expected = alone(server, PROMPT, 5, steps=5, scale=3, sampler="dpmpp_2m_karras", height=32, width=32)
    plain = alone(server, PROMPT, 5, steps=5, scale=3, sampler="dpmpp_2m", height=32, width=32)
    assert np.array_equal(pixels(r.image), pixels(expected[0]))
    assert not np.array_equal(pixels(expected[0]), pixels(plain[0]))


def test_seed_minus_one_is_random_and_recorded(server):
    api = server.api()
    a = api.txt2img(prompt=PROMPT, seed=-1, width=32, height=32, steps=2)
    b = api.txt2img(prompt=PROMPT, seed=-1, width=32, height=32, steps=2)
    assert a.info["seed"] != b.info["seed"] and 0 <= a.info["seed"] < 2**32
    again = api.txt2img(prompt=PROMPT, seed=a.info["seed"], width=32, height=32, steps=2)
    assert np.array_equal(pixels(again.image), pixels(a.image))


def test_img2img_with_webuiapi(server):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    r = server.api().img2img(images=[init], prompt="a ship", seed=3, width=32, height=32, steps=8,
                             denoising_strength=0.5, cfg_scale=3)
    assert len(r.images) == 1 and r.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in r.image.info["parameters"]
    expected = alone(server, "a ship", 3, steps=8, scale=3, height=32, width=32, init_image=init, strength=0.5)
    assert np.array_equal(pixels(r.image), pixels(expected[0]))


def test_samplers_models_options(server):
    api = server.api()
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "DDPM", "VQ-Diffusion", "VQ-Diffusion purity"} \
        == set(names)  # VQ-Diffusion's because the server holds a VQ-Diffusion model
    models = api.get_sd_models()
    assert [m["model_name"] for m in models] == ["default", "tiny", "default-vq"]
    assert all(m["title"] == f"{m['model_name']} [{m['hash']}]" and len(m["hash"]) == 10 for m in models)
    assert api.util_get_current_model() == models[0]["title"]
    api.util_set_model("tiny")  # webuiapi: POST /sdapi/v1/options {"sd_model_checkpoint": title}
    try:
        assert api.util_get_current_model() == models[1]["title"]
        r = api.txt2img(prompt=PROMPT, seed=1, width=16, height=16, steps=3)
        assert r.info["sd_model_name"] == "tiny" and r.image.size == (16, 16)
        assert f"Model hash: {models[1]['hash']}" in r.image.info["parameters"]
        # a request may name its model; other names (and paths) are refused
        r = api.txt2img(prompt=PROMPT, seed=1, width=32, height=32, steps=3,
                        override_settings={"sd_model_checkpoint": "default"})
        assert r.info["sd_model_name"] == "default"
        bad = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "/etc/passwd"})
        assert bad.status_code == 404 and "unknown model" in bad.json()["detail"]
    finally:
        api.set_options({"sd_model_checkpoint": "default"})
    assert api.util_get_current_model() == models[0]["title"]


def test_vq_diffusion_model_runs_the_sampler_a_request_names(server):
    """A VQ-Diffusion model runs the VQ-Diffusion sampler a request names ("VQ-Diffusion purity" or our id), the
    same pixels as its pipeline's generate; a latent-diffusion sampler's name (AUTOMATIC1111 clients send one with
    every request) gives the model's own sampler; a VQ-Diffusion sampler asked of a latent model is a 422."""
    api = server.api()
    vq = server.service.models.find("default-vq").pipe
    ask = dict(prompt=PROMPT, seed=3, steps=6, cfg_scale=4, width=32, height=32,
               override_settings={"sd_model_checkpoint": "default-vq"})
    chain, _ = vq.generate(PROMPT, steps=6, scale=4, seed=3)
    purity, _ = vq.generate(PROMPT, steps=6, scale=4, seed=3, sampler="vq_purity")
    assert not np.array_equal(pixels(to_pil(chain)[0]), pixels(to_pil(purity)[0]))
    for name, expected, label in (("VQ-Diffusion purity", purity, "VQ-Diffusion purity"),
                                  ("vq_purity", purity, "VQ-Diffusion purity"),
                                  ("VQ-Diffusion", chain, "VQ-Diffusion"), ("Euler a", chain, "VQ-Diffusion")):
        r = api.txt2img(sampler_name=name, **ask)
        assert r.info["sampler_name"] == label and f"Sampler: {label}," in r.image.info["parameters"], name
        assert np.array_equal(pixels(r.image), pixels(to_pil(expected)[0])), name
    r = api.txt2img(**ask)  # no sampler: the model's own (its config's, "vq")
    assert r.info["sampler_name"] == "VQ-Diffusion"
    bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**GOOD, "sampler_name": "VQ-Diffusion purity"})
    assert bad.status_code == 422 and "VQ-Diffusion's" in bad.json()["detail"]
    assert "latent-diffusion model" in bad.json()["detail"] and "Euler a" in bad.json()["detail"]


def test_progress_and_interrupt(server):
    api = server.api()
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(api.txt2img, prompt=PROMPT, seed=11, batch_size=4, width=64, height=64, steps=150,
                             do_not_save_grid=True)
        for _ in range(2000):
            p = api.get_progress()
            if p["state"]["sampling_step"] >= 2 and p["current_image"]:
                break
            time.sleep(0.01)
        assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["sampling_steps"] == 150
        preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
        assert preview.format == "PNG" and preview.size == (64, 64)
        assert api.interrupt() == {}
        r = future.result(timeout=60)
    assert len(r.images) == 4 and r.images[0].size == (64, 64)  # the last predicted x0, decoded
    assert api.get_progress()["state"]["job_count"] == 0
    done = api.txt2img(prompt=PROMPT, seed=11, width=32, height=32, steps=3)  # the worker runs on
    assert len(done.images) == 1


def test_concurrent_requests_are_batched_and_get_their_alone_images(server):
    worker = server.service.worker
    jobs = [("a photo of a cat", 101), ("a photo of a ship", 202), ("a red car", 303), ("a photo of a dog", 404)]
    before = health(server)
    worker.window = 30.0  # the batch closes when max_batch (4) images are waiting, long before this
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda j: server.api().txt2img(prompt=j[0], seed=j[1], width=32, height=32,
                                                                   steps=5), jobs))
    finally:
        worker.window = 0.02
    after = health(server)
    assert after["generate_calls"] - before["generate_calls"] == 1  # one generate call made all four
    assert after["batched_requests"] - before["batched_requests"] == 4
    for (prompt, seed), r in zip(jobs, results):
        assert r.info["all_seeds"] == [seed] and r.info["prompt"] == prompt
        expected = alone(server, prompt, seed, steps=5, scale=7, height=32, width=32)[0]  # webuiapi: cfg_scale 7
        single = server.api().txt2img(prompt=prompt, seed=seed, width=32, height=32, steps=5)  # alone, via HTTP
        assert np.array_equal(pixels(single.image), pixels(expected))
        assert_same_image(r.image, expected)


def assert_same_image(image, expected):
    """The same image up to float rounding: the CPU's matrix kernels sum in an order that depends on the batch
    size, so a batched image's floats differ from its alone ones by ~1e-5 (tests/test_pipeline.py), which moves a
    pixel across a rounding boundary now and then: at most 1 level of 255, in at most 1 % of the values."""
    a, b = pixels(image).astype(int), pixels(expected).astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() <= 0.01, (np.abs(a - b).max(), (a != b).mean())


def test_only_compatible_requests_are_batched(server):
    """Same settings share a call; other steps, or a prompt of more chunks (over 75 CLIP tokens: every row of a
    call is padded to the most chunks), run in calls of their own."""
    long_prompt = ", ".join(["a photo of a small red cat on a green field"] * 10)
    cases = [(PROMPT, 5, 4), (long_prompt, 6, 4), ("a photo of a ship", 7, 4), (PROMPT, 8, 3)]
    worker, before = server.service.worker, health(server)
    worker.window = 1.0
    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(lambda c: server.api().txt2img(prompt=c[0], seed=c[1], steps=c[2], width=32,
                                                                   height=32, cfg_scale=3), cases))
    finally:
        worker.window = 0.02
    after = health(server)
    assert after["generate_calls"] - before["generate_calls"] == 3
    assert after["batched_requests"] - before["batched_requests"] == 2
    for (prompt, seed, steps), r in zip(cases, results):
        assert r.info["steps"] == steps and r.info["prompt"] == prompt
        assert_same_image(r.image, alone(server, prompt, seed, steps=steps, scale=3, height=32, width=32)[0])


def test_full_queue_answers_503_with_retry_after(server):
    worker = server.service.worker
    saved = worker.max_queue, worker.window
    worker.max_queue, worker.window = 1, 2.0  # the first request waits in the queue for the window
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.api().txt2img, prompt=PROMPT, seed=1, width=32, height=32, steps=3)
            while worker.queue_length() == 0:
                time.sleep(0.01)
            r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 4, "width": 32,
                                                                     "height": 32})
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "queue" in r.json()["detail"]
            assert len(first.result(timeout=60).images) == 1
    finally:
        worker.max_queue, worker.window = saved


def test_health_docs_and_page(server):
    h = health(server)
    assert h["status"] == "ok" and h["models"][0].startswith("default [")
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/sdapi/v1/txt2img" in schema["paths"] and "/sdapi/v1/progress" in schema["paths"]
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_info_is_a_json_string_as_automatic1111_sends_it(server):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 9, "width": 32, "height": 32,
                                                           "steps": 2, "send_images": False})
    body = r.json()
    assert r.status_code == 200 and body["images"] == [] and isinstance(body["info"], str)
    info = json.loads(body["info"])
    for key in ("prompt", "seed", "all_seeds", "all_prompts", "sampler_name", "steps", "cfg_scale", "width",
                "height", "infotexts", "sd_model_hash", "negative_prompt", "index_of_first_image"):
        assert key in info
    assert info["sampler_name"] == "Euler a" and info["steps"] == 2  # the model's own sampler


def test_api_key_and_basic_auth(server):
    from starlette.testclient import TestClient

    service = Service(ServeSettings(api_key="s3cret", api_auth="alice:pw"), server.service.models)
    try:
        client = TestClient(create_app(service))
        for path in ("/health", "/", "/static/index.html", "/docs", "/openapi.json"):  # open: no secrets there
            assert client.get(path).status_code == 200, path
        r = client.get("/sdapi/v1/sd-models")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/sdapi/v1/sd-models", auth=("anyone", "s3cret")).status_code == 200
        assert client.get("/sdapi/v1/sd-models", auth=("alice", "pw")).status_code == 200
        assert client.get("/sdapi/v1/sd-models", auth=("alice", "nope")).status_code == 401
        assert client.get("/sdapi/v1/sd-models", headers={"Authorization": "Basic !!!"}).status_code == 401
        assert client.post("/sdapi/v1/interrupt").status_code == 401
        assert client.get("/sdapi/v1/progress").status_code == 401
    finally:
        service.stop()


# -- bad requests: a corpus of malformed, mistyped, out-of-range and unsupported requests (and bodies over
# the limit, wrong methods and paths), each a 4xx with a message and one log line, never a 5xx; then good ones.

T2I, I2I, OPTIONS = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"
GOOD = {"prompt": "a photo of a cat", "width": 32, "height": 32, "steps": 2, "seed": 1}


def png_b64(size=(32, 32)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def corpus() -> list[tuple[str, str, object]]:
    """(method, path, body): body a dict/list (sent as JSON), bytes/str (sent as is), or None."""
    cases = [
        ("POST", T2I, b"{bad json"), ("POST", T2I, b""), ("POST", T2I, b"[]"), ("POST", T2I, b"null"),
        ("POST", T2I, b'"a string"'), ("POST", T2I, b"\xff\xfe\x00garbage"), ("POST", T2I, "[" * 5000 + "]" * 5000),
        ("POST", T2I, b'{"steps": NaN}'), ("POST", T2I, b'{"cfg_scale": Infinity}'),
        ("POST", T2I, b'{"cfg_scale": 1e999}'), ("POST", T2I, b'{"steps": 1e999}'),
    ]
    wrong = {"prompt": [1, 2], "negative_prompt": {"a": 1}, "seed": "abc", "steps": "ten", "cfg_scale": "high",
             "width": 32.5, "height": [32], "batch_size": "two", "n_iter": None, "sampler_name": 5, "eta": "x",
             "override_settings": [1], "send_images": "maybe", "styles": "x"}
    cases += [("POST", T2I, {**GOOD, k: v}) for k, v in wrong.items()]
    bad_values = {"steps": [0, -1, 151, 10**12, 2**64], "width": [0, -32, 33, 100000, 10**30],
                  "height": [-1, 7, 2**40], "seed": [-2, 2**32, 2**70, -(2**63)], "cfg_scale": [-1, 1e6, 1e308],
                  "batch_size": [0, -3, 17, 10**9], "n_iter": [0, 5000], "eta": [-0.5],
                  "sampler_name": ["nope", "DPM++ 3M", "../../etc/passwd", "VQ-Diffusion purity", "vq"],
                  "scheduler": ["exponential", "sgm_uniform"], "prompt": ["x" * 2001], "negative_prompt": ["y" * 3000],
                  "enable_hr": [True], "restore_faces": [True], "tiling": [True], "subseed_strength": [0.5],
                  "script_name": ["x/y"], "alwayson_scripts": [{"ControlNet": {"args": []}}], "styles": [["s"]],
                  "override_settings": [{"sd_model_checkpoint": "/etc/passwd"}, {"CLIP_stop_at_last_layers": 2},
                                        {"sd_model_checkpoint": 5}],
                  "s_noise": [0.5]}
    cases += [("POST", T2I, {**GOOD, k: v}) for k, values in bad_values.items() for v in values]
    cases += [("POST", T2I, {**GOOD, "sampler_name": "Euler a", "eta": 0.3}),
              ("POST", T2I, {**GOOD, "batch_size": 4, "n_iter": 5})]
    img = png_b64()
    cases += [("POST", I2I, {**GOOD, "init_images": v}) for v in
              ([], ["not base64!!"], ["aGVsbG8gd29ybGQ="], [img, img], ["data:image/png;base64,@@@"], [""], [5])]
    cases += [("POST", I2I, {**GOOD, "init_images": [img], **extra}) for extra in
              ({"denoising_strength": 0}, {"denoising_strength": 1.5}, {"denoising_strength": -1},
               {"denoising_strength": 0.01}, {"mask": img}, {"resize_mode": 2},
               {"override_settings": {"sd_model_checkpoint": "default-vq"}})]
    cases += [("POST", I2I, {**GOOD, "init_images": [png_b64((5000, 5000))]})]
    cases += [("POST", OPTIONS, {"sd_model_checkpoint": "nope"}), ("POST", OPTIONS, {"sd_model_checkpoint": "../x"}),
              ("POST", OPTIONS, {"unknown_option": 1}), ("POST", OPTIONS, b"{"), ("POST", OPTIONS, [1, 2]),
              ("GET", T2I, None), ("DELETE", "/sdapi/v1/options", None), ("GET", "/sdapi/v1/nope", None),
              ("GET", "/../../etc/passwd", None), ("GET", "/static/../app.py", None),
              ("GET", "/sdapi/v1/progress?skip_current_image=perhaps", None)]
    return cases


def send(client, method, path, body):
    if body is None:
        return client.request(method, path)
    if isinstance(body, (bytes, str)):
        return client.request(method, path, content=body, headers={"content-type": "application/json"})
    return client.request(method, path, json=body)


def test_fuzz_bad_requests_get_a_4xx_with_a_message_and_one_log_line(server, caplog):
    cases = corpus()
    with httpx.Client(base_url=server.url, timeout=60) as client, caplog.at_level(logging.WARNING,
                                                                                  "latentdiff.serve"):
        for method, path, body in cases:
            r = send(client, method, path, body)
            assert 400 <= r.status_code < 500, (method, path, str(body)[:100], r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert detail and len(json.dumps(detail)) < 5000, (method, path, r.text[:300])  # no echo of the input
        rejected = [rec for rec in caplog.records if rec.getMessage().startswith("rejected ")]
        assert len(rejected) == len(cases)
        # bodies over the limit: by Content-Length, and streamed without one
        big = json.dumps({**GOOD, "prompt": "x" * (2**20 + 10)}).encode()
        r = client.post(T2I, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = client.post(T2I, content=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413
        with socket.create_connection(("127.0.0.1", server.port)) as sock:  # clients refuse to send this
            sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: abc\r\nConnection: close\r\n\r\n{}")
            status = int(sock.recv(4096).split(b" ")[1])
        assert 400 <= status < 500
        # the server is alive and a good request succeeds
        assert client.get("/health").json()["status"] == "ok"
        r = client.post(T2I, json=GOOD)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        r = client.post(I2I, json={**GOOD, "init_images": ["data:image/png;base64," + png_b64()]})
        assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_out_of_memory_and_nan_images_are_answered_and_the_server_runs_on(server, monkeypatch, caplog):
    """Out of memory: 503 naming what to ask for instead (not a 500), and the next request succeeds; an image
    with NaN pixels is left out of the response (logged), never sent as a black PNG."""
    pipe = server.service.models.current.pipe
    generate = type(pipe).generate

    def oom(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(type(pipe), "generate", oom)
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 1}, timeout=60)
    assert r.status_code == 503 and "out of memory" in r.json()["detail"] and "fewer images" in r.json()["detail"]

    def nan_first(self, *args, **kwargs):
        images, params = generate(self, *args, **kwargs)
        images = images.clone()  # an inference tensor: changed on a copy
        images[0] = float("nan")
        return images, params

    monkeypatch.setattr(type(pipe), "generate", nan_first)
    with caplog.at_level(logging.WARNING, logger="latentdiff.serve"):
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=60,
                       json={"prompt": PROMPT, "steps": 2, "seed": 7, "batch_size": 2, "do_not_save_grid": True})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    kept = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert "Seed: 8" in kept.info["parameters"] and any("seed 7 has NaN" in m for m in caplog.messages)
    monkeypatch.setattr(type(pipe), "generate", generate)
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
