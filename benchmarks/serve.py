"""Load test of ``latentdiff serve``: N concurrent clients each send M txt2img requests, one after another, to the
AUTOMATIC1111 endpoint; reports throughput (requests and images per second), latency percentiles (p50, p95, p99),
errors, and the mean images per generate call (from the server's ``/health`` counters), with batching on and off.

Two servers are started as ``latentdiff serve`` processes on free loopback ports, one with batching
(``--max-batch``, ``--batch-window-ms``) and one with ``--no-batching``, same model and settings; the runs
alternate (on, off, on, off, ...) so that both see the same machine load, after one warm-up request each. Each
request has its own prompt and seed (same size, steps and sampler, so all are compatible). Prints a markdown table:
the median of the repeats and, in brackets, their min-max.

    python benchmarks/serve.py                                      # 8 clients x 4 requests, 3 repeats, CPU
    python benchmarks/serve.py --clients 16 --requests 8 --ckpt v1-5-pruned-emaonly.safetensors --size 512 \\
        --steps 20 --device cuda --precision fp16
    python benchmarks/serve.py --url http://127.0.0.1:7860          # one already running server, as it is

Needs the serve extra and httpx (``pip install -e .[dev]``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode (alternating)")
    p.add_argument("--ckpt", default="default", help="model of the servers")
    p.add_argument("--size", type=int, default=32, help="image width and height")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the batching server")
    p.add_argument("--batch-window-ms", type=float, default=50.0, help="--batch-window-ms of the batching server")
    p.add_argument("--device", default="cpu", help="--device of the servers")
    p.add_argument("--precision", default="auto", help="--precision of the servers")
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting two")
    args = p.parse_args(argv)
    for name in ("clients", "requests", "repeats", "size", "max_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def start_server(args, batching: bool, log: Path) -> tuple[subprocess.Popen, str]:
    """A ``latentdiff serve`` process on a free port, and its URL once it answers."""
    cmd = [sys.executable, "-m", "latentdiff", "serve", "--port", "0", "--ckpt", args.ckpt, "--device", args.device,
           "--precision", args.precision, "--max-queue", str(max(64, args.clients * 2)),
           "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.batch_window_ms)]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, stderr=log.open("w"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", log.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def payload(args, client: int, i: int) -> dict:
    body = {"prompt": f"a photo of a {CLASSES[(client + i) % len(CLASSES)]}", "seed": 1000 * client + i,
            "width": args.size, "height": args.size, "do_not_save_grid": True}
    if args.steps:
        body["steps"] = args.steps
    return body


async def load(url: str, args) -> dict:
    """One run: every client's requests; latencies in seconds, errors, wall time, generate calls."""
    latencies, errors = [], []

    async def client(c: int, http: httpx.AsyncClient):
        for i in range(args.requests):
            start = time.perf_counter()
            try:
                r = await http.post("/sdapi/v1/txt2img", json=payload(args, c, i))
                ok = r.status_code == 200 and len(r.json()["images"]) == 1
                if not ok:
                    errors.append(f"{r.status_code} {r.text[:100]}")
            except httpx.HTTPError as e:
                errors.append(repr(e))
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        before = (await http.get("/health")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(args.clients)))
        wall = time.perf_counter() - start
        after = (await http.get("/health")).json()
    calls = after["generate_calls"] - before["generate_calls"]
    images = after["images"] - before["images"]
    return {"latencies": latencies, "errors": errors, "wall": wall, "images_per_call": images / max(1, calls)}


def summary(runs: list[dict]) -> dict:
    def spread(values, fmt):
        return f"{fmt(statistics.median(values))} [{fmt(min(values))}-{fmt(max(values))}]"

    rps = [len(r["latencies"]) / r["wall"] for r in runs]
    pct = {q: [float(np.percentile(r["latencies"], q)) if r["latencies"] else float("nan") for r in runs]
           for q in (50, 95, 99)}
    return {"throughput (req/s)": spread(rps, lambda v: f"{v:.2f}"),
            **{f"p{q} (s)": spread(v, lambda v: f"{v:.2f}") for q, v in pct.items()},
            "errors": str(sum(len(r["errors"]) for r in runs)),
            "images per call": spread([r["images_per_call"] for r in runs], lambda v: f"{v:.1f}")}


def main(argv=None) -> int:
    args = parse_args(argv)
    servers, procs = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                servers["as running"] = args.url.rstrip("/")
            else:
                for mode, batching in (("batching on", True), ("batching off", False)):
                    proc, url = start_server(args, batching, Path(tmp) / f"{mode}.log")
                    procs.append(proc)
                    servers[mode] = url
            for url in servers.values():  # warm-up
                httpx.post(f"{url}/sdapi/v1/txt2img", json=payload(args, 0, 0), timeout=600).raise_for_status()
            runs = {mode: [] for mode in servers}
            for repeat in range(args.repeats):
                for mode, url in servers.items():
                    print(f"repeat {repeat + 1}/{args.repeats}: {mode}", file=sys.stderr, flush=True)
                    runs[mode].append(asyncio.run(load(url, args)))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    rows = {mode: summary(r) for mode, r in runs.items()}
    columns = list(next(iter(rows.values())))
    print(f"{args.clients} clients x {args.requests} requests, {args.size}x{args.size}, model {args.ckpt}, "
          f"{args.repeats} repeats (median [min-max])\n")
    print("| mode | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for mode, row in rows.items():
        print(f"| {mode} | " + " | ".join(row[c] for c in columns) + " |")
    for mode, r in runs.items():
        for err in [e for run in r for e in run["errors"]][:5]:
            print(f"error ({mode}): {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
