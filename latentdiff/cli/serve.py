"""An HTTP server that AUTOMATIC1111 clients already speak (its ``/sdapi/v1`` API), with a web page at ``/``.

Examples (from the repository root)::

    latentdiff serve                                           # embedded model on http://127.0.0.1:7860
    latentdiff serve --ckpt default --ckpt default-vq --port 7861
    latentdiff serve --ckpt v1-5-pruned-emaonly.safetensors --device cuda --precision fp16 --max-batch 8
    latentdiff serve --api-key SECRET --host 0.0.0.0           # clients send "Authorization: Bearer SECRET"
    latentdiff serve --ray --num-replicas 2 --num-gpus 1       # Ray Serve: one replica per GPU

One process loads every ``--ckpt`` once (the first is the current model; clients switch with the option
``sd_model_checkpoint`` or a request's ``override_settings``, by name only). Requests wait in one queue; the worker
runs compatible ones (same model, kind, size, steps, sampler, guidance scale, eta) arriving within
``--batch-window-ms`` of the oldest as one batch of at most ``--max-batch`` images, each image with its own seed,
so batching never changes an image. Over-limit or malformed requests get a 4xx and one log line; a full queue
(``--max-queue``) answers 503 with Retry-After. A port in use, or a checkpoint that cannot be loaded, exits 2.

With ``--ray`` the same app runs as a Ray Serve deployment (FastAPI ingress) on the Ray cluster at
``--ray-address`` (default: a local one started for this process), ``--num-replicas`` replicas (or autoscaling
between ``--min-replicas`` and ``--max-replicas``), each with ``--num-gpus`` GPUs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from latentdiff.cli.common import ArgumentParser, Float, Int, fail

PORT = Int(0, 65535)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from latentdiff.serve.schemas import Limits

    d = Limits()
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("--ckpt", "--checkpoint", dest="ckpt", action="append", default=None,
                   help="a model to serve (repeat for several): 'default', 'default-vq', a latentdiff .safetensors, "
                        "a Stable Diffusion file or a diffusers folder; its name is the file's stem; default: the "
                        "embedded default model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=PORT, default=7860, help="TCP port (AUTOMATIC1111's default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights/compute precision (auto: bf16 on CUDA if supported, else fp16; fp32 on CPU)")
    p.add_argument("--max-batch", type=Int(1, 1024), default=8, help="images per generate call at most")
    p.add_argument("--batch-window-ms", type=Float(0, 60000), default=50.0,
                   help="how long the oldest request waits for compatible ones to join its batch")
    p.add_argument("--no-batching", action="store_true", help="run each request alone (one generate call each)")
    p.add_argument("--max-pixels", type=Int(1), default=d.max_pixels, help="width x height of an image at most")
    p.add_argument("--max-steps", type=Int(1), default=d.max_steps, help="sampling steps at most")
    p.add_argument("--max-images", type=Int(1), default=d.max_images,
                   help="images per request (batch_size x n_iter) at most")
    p.add_argument("--max-prompt-chars", type=Int(1), default=d.max_prompt_chars,
                   help="characters of a prompt (and of a negative prompt) at most")
    p.add_argument("--max-body-mb", type=Float(0, 4096, low_open=True), default=d.max_body_bytes / 2**20,
                   help="request body size at most, in MiB")
    p.add_argument("--max-queue", type=Int(1), default=d.max_queue,
                   help="requests waiting at most; more get 503 with Retry-After")
    p.add_argument("--api-key", default=None,
                   help="require this key: 'Authorization: Bearer KEY', or basic auth with KEY as the password; "
                        "default: the environment variable LATENTDIFF_API_KEY when set, else no key")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS",
                   help="require HTTP basic auth with this user and password (AUTOMATIC1111's --api-auth)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    ray = p.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of one uvicorn process")
    ray.add_argument("--ray-address", default=None,
                     help="the Ray cluster to join (e.g. auto, or ray://HEAD:10001); default: start a local one")
    ray.add_argument("--num-replicas", type=Int(1, 4096), default=1, help="replicas (without autoscaling)")
    ray.add_argument("--min-replicas", type=Int(0, 4096), default=None,
                     help="autoscaling: replicas at least (with --max-replicas)")
    ray.add_argument("--max-replicas", type=Int(1, 4096), default=None, help="autoscaling: replicas at most")
    ray.add_argument("--num-gpus", type=Float(0, 64), default=0.0, help="GPUs per replica (1: one replica per GPU)")
    ray.add_argument("--num-cpus", type=Float(0, 1024), default=1.0, help="CPUs per replica")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from latentdiff.serve.schemas import Limits
    from latentdiff.serve.service import API_KEY_ENV, ServeSettings

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.api_auth is not None and ":" not in args.api_auth:
        fail("--api-auth must be USER:PASS")
    if (args.min_replicas is None) != (args.max_replicas is None):
        fail("--min-replicas and --max-replicas go together (autoscaling)")
    if args.min_replicas is not None and args.min_replicas > args.max_replicas:
        fail(f"--min-replicas {args.min_replicas} is above --max-replicas {args.max_replicas}")
    limits = Limits(args.max_pixels, args.max_steps, args.max_images, args.max_prompt_chars,
                    max(1, int(args.max_body_mb * 2**20)), args.max_queue)
    settings = ServeSettings(args.ckpt or ["default"], args.device, args.precision, limits, args.max_batch,
                             args.batch_window_ms, not args.no_batching, api_key, args.api_auth)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = _bind(args.host, args.port)
    if args.ray:
        sock.close()  # Ray's proxy binds the port itself
        return _run_ray(args, settings)
    return _run_uvicorn(args, settings, sock)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; exits 2 with one message when the port is taken or the host unknown."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            fail(f"port {port} on {host} is already in use (another server?); choose another with --port")
        fail(f"cannot listen on {host}:{port} ({e.strerror or e})")


def _load(settings):
    from latentdiff.cli.common import resolve_device_dtype
    from latentdiff.serve.service import Service

    resolve_device_dtype(settings.device, settings.precision)  # exits 2 for a device this machine lacks
    try:
        return Service.start(settings)
    except (ValueError, OSError) as e:
        fail(str(e))


def _run_uvicorn(args, settings, sock: socket.socket) -> int:
    import uvicorn

    from latentdiff.serve.app import create_app

    service = _load(settings)
    app = create_app(service)
    host, port = sock.getsockname()[:2]
    models = ", ".join(m.title for m in service.models.models)
    print(f"latentdiff serve: http://{host}:{port}/ (models: {models}; API docs at /docs)", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level="info", access_log=args.access_log, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a normal stop
        pass
    finally:
        service.stop()
        sock.close()
    return 0


def _run_ray(args, settings) -> int:
    try:
        from latentdiff.serve.ray_app import deploy
    except ImportError as e:
        fail(f"--ray needs Ray Serve: pip install 'latentdiff[ray]' ({e})")
    autoscaling = None
    if args.min_replicas is not None:
        autoscaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    deploy(settings, host=args.host, port=args.port, num_replicas=args.num_replicas, autoscaling=autoscaling,
           num_gpus=args.num_gpus, num_cpus=args.num_cpus, address=args.ray_address, blocking=True)
    return 0
