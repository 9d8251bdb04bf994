"""The server as a Ray Serve deployment: each replica holds its own :class:`Service` (models, queue, batching
worker) and answers with the same FastAPI app (:func:`latentdiff.serve.app.create_app`) as ingress, so the same
clients work against a cluster. Ray's proxy spreads requests over the replicas; each replica batches what it gets.

    from latentdiff.serve.ray_app import build, deploy
    deploy(ServeSettings(ckpts=["default"]), port=8000, num_replicas=2, num_gpus=1)     # ray.init + serve.run
    serve.run(build(settings, autoscaling={"min_replicas": 1, "max_replicas": 4}), route_prefix="/")

``/sdapi/v1/options`` sets the model of the replica that answers it only; with several replicas and several
models, name the model per request (``override_settings.sd_model_checkpoint``).
"""

from __future__ import annotations

import ray
from ray import serve

from latentdiff.serve.app import create_app
from latentdiff.serve.service import ServeSettings, Service


@serve.ingress()
class LatentdiffServer:
    """One replica: loads the models once, runs its worker thread, and serves the app."""

    def __init__(self, settings: ServeSettings):
        self.service = Service.start(settings)

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()


def build(settings: ServeSettings, num_replicas: int = 1, autoscaling: dict | None = None, num_gpus: float = 0.0,
          num_cpus: float = 1.0):
    """The bound Ray Serve application: ``num_replicas`` replicas, or ``autoscaling`` (Ray's autoscaling_config,
    e.g. ``{"min_replicas": 1, "max_replicas": 4}``), each with ``num_gpus`` GPUs and ``num_cpus`` CPUs. Each
    replica takes up to max_queue + max_batch requests at once, so that its own queue does the batching."""
    options = {"ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus},
               "max_ongoing_requests": settings.limits.max_queue + settings.max_batch}
    if autoscaling:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(LatentdiffServer, name="latentdiff").options(**options).bind(settings)


def deploy(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, num_replicas: int = 1,
           autoscaling: dict | None = None, num_gpus: float = 0.0, num_cpus: float = 1.0, address: str | None = None,
           blocking: bool = False) -> None:
    """Connect to (``address``) or start a Ray instance, start Serve's HTTP proxy on host:port and deploy
    :func:`build` at ``/``; with ``blocking`` wait until interrupted, then shut Serve down."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(settings, num_replicas, autoscaling, num_gpus, num_cpus), name="latentdiff", route_prefix="/",
              blocking=False)
    if blocking:
        import signal
        import time

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        print(f"latentdiff serve --ray: http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
