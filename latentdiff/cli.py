"""Shared command-line plumbing for tools/: parser defaults, clean failures, device/precision choice."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in ``--help`` and the module docstring kept verbatim."""

    def __init__(self, description: str | None = None, **kwargs):
        class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
            pass

        super().__init__(description=description, formatter_class=Formatter, **kwargs)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear message on stderr and exit (status 2: bad input), with no traceback."""
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "latentdiff"
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def resolve_device_dtype(device: str = "auto", precision: str = "auto"):
    """``auto`` picks CUDA when available; precision ``auto`` is fp16 on CUDA and fp32 elsewhere."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        fail(f"--device {device!r} is not a device torch knows: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device} was asked for but CUDA is not available on this machine")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    if precision not in dtypes:
        fail(f"--precision {precision!r} is not one of {sorted(dtypes)}")
    if dev.type == "cpu" and precision == "fp16":
        fail("--precision fp16 is not supported on the CPU; use fp32 or bf16")
    return dev, dtypes[precision]
