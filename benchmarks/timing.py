"""Side-by-side timing shared by the benchmark scripts of this folder (imported as ``timing``: the scripts run as
``python benchmarks/<name>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(label: str, fns: dict, repeats: int, device: torch.device) -> tuple[dict, dict, float]:
    """Wall-clock and process CPU seconds per call of each function, interleaved repeat by repeat, and the max
    |difference| of the two functions' last outputs. Progress goes to stderr.

    On a shared CPU, CPU time is the steadier measure: it does not count time spent waiting for a core."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    outputs = {}
    for i in range(repeats):
        print(f"{label}: repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
        for name, fn in fns.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    ours, theirs = (out.float() for out in outputs.values())
    return wall, cpu, (ours - theirs).abs().max().item()
