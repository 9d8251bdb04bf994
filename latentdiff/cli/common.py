"""What every subcommand shares: its argument parser, clean failures, and device/precision choice."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from latentdiff.argtypes import (  # noqa: F401 - the numeric flag types, re-exported for the commands
    BATCH,
    FINITE,
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    POSITIVE_FLOAT,
    SEED,
    SIGMA,
    THREADS,
    UNIT,
    WORKERS,
    Float,
    Int,
)

_PROG = ["latentdiff"]  # the program name of the command being run, for fail()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults shown in ``--help`` and the module docstring kept verbatim. Bad flags print the usage
    and exit with status 2 (argparse's own behaviour)."""

    def __init__(self, description: str | None = None, prog: str | None = None, **kwargs):
        class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
            pass

        super().__init__(description=description, prog=prog, formatter_class=Formatter, **kwargs)
        _PROG[0] = self.prog


def report_error(message: str, code: int = 2) -> int:
    """Print one clear message on stderr and return the exit status (2: bad input)."""
    print(f"{_PROG[0]}: error: {message}", file=sys.stderr)
    return code


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear message on stderr and exit (status 2: bad input), with no traceback."""
    raise SystemExit(report_error(message, code))


def guidance_interval_option(interval, vq: bool) -> tuple[float, float] | None:
    """``--guidance-interval LO HI`` as given (None when absent), checked against the loaded model: exits 2 for a
    VQ-Diffusion model or when LO is not below HI."""
    if interval is None:
        return None
    if vq:
        fail("--guidance-interval applies to latent-diffusion models only")
    lo, hi = interval
    if not lo < hi:
        fail(f"--guidance-interval {lo:g} {hi:g}: SIGMA_LO must be below SIGMA_HI")
    return lo, hi


def report_paths(out, overwrite: bool):
    """``--out`` of a command writing a JSON report and its Markdown table beside it: ``(out.json, out.md)``,
    checked before any work (ValueError: not .json, or under a file; FileExistsError: exists without
    ``overwrite``)."""
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out must end in .json, got {out}")
    existing = next(p for p in out.absolute().parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a folder")
    md = out.with_suffix(".md")
    for path in (out, md):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    return out, md


def lock_outdir(folder, what: str):
    """Lock ``folder`` for this command (see :mod:`latentdiff.locks`; a context manager that releases it); exits 2
    naming the holder when another run writes there."""
    from latentdiff.locks import FolderLockedError, folder_lock

    try:
        return folder_lock(folder, what)
    except (FolderLockedError, OSError) as e:
        fail(str(e))


def resolve_device_dtype(device: str = "auto", precision: str = "auto"):
    """``(torch.device, dtype)`` for ``--device``/``--precision`` (see :mod:`latentdiff.devices`); exits 2 on a
    device or precision this machine cannot use."""
    from latentdiff.devices import resolve_device, resolve_precision

    try:
        dev = resolve_device(device)
        return dev, resolve_precision(precision, dev)
    except ValueError as e:
        fail(str(e))
