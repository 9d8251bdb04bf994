"""Checked numbers for command-line flags: argparse ``type``s that refuse what no run can use (nan, inf, a
negative count, a million DataLoader workers) with a usage error (exit 2) before any work starts.

    parser.add_argument("--steps", type=POSITIVE)          # 1, 2, ...
    parser.add_argument("--strength", type=Float(0, 1, low_open=True))

This module imports nothing from latentdiff: the commands (latentdiff.cli) and the shared evaluation options
(latentdiff.data.image_sources) use it.
"""

from __future__ import annotations

import argparse
import math


class Int:
    """An argparse ``type``: an integer in [low, high] (either end open when None), else a usage error naming the
    bound. ``bad_values`` are command-line texts it refuses (the CLI fuzz test feeds them to every such flag)."""

    def __init__(self, low: int | None = None, high: int | None = None):
        self.low, self.high = low, high
        self.__name__ = "integer"  # argparse names the type in its messages

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if self.low is not None and value < self.low:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed value, {self.low}")
        if self.high is not None and value > self.high:
            raise argparse.ArgumentTypeError(f"{value} is above the largest allowed value, {self.high}")
        return value

    @property
    def bad_values(self) -> list[str]:
        out = ["", "abc", "1.5", "nan", "0x10"]
        if self.low is not None:
            out.append(str(self.low - 1))
        out.append(str(self.high + 1) if self.high is not None else "")
        return [v for v in out if v]


class Float:
    """An argparse ``type``: a finite number (never nan; inf only with ``allow_inf``) in [low, high], or (low, high]
    with ``low_open``; else a usage error naming the bound."""

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False,
                 allow_inf: bool = False):
        self.low, self.high, self.low_open, self.allow_inf = low, high, low_open, allow_inf
        self.__name__ = "number"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise argparse.ArgumentTypeError(f"{value:g} must be {'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None and value > self.high:
            raise argparse.ArgumentTypeError(f"{value:g} must be <= {self.high:g}")
        return value

    @property
    def bad_values(self) -> list[str]:
        out = ["", "abc", "nan", "-inf"] + ([] if self.allow_inf else ["inf", "1e999"])
        if self.low is not None:
            out.append(f"{self.low:g}" if self.low_open else f"{self.low - 1:g}")
        if self.high is not None:
            out.append(f"{self.high + 1:g}")
        return out


# The numeric flags' types. Upper bounds keep a typo from asking for the impossible (a million DataLoader
# workers, a batch no machine holds); they are far above any real use.
POSITIVE = Int(1)
NON_NEGATIVE = Int(0)
SEED = Int(0, 2**32 - 1)  # AUTOMATIC1111's range
BATCH = Int(1, 65536)
WORKERS = Int(0, 256)
THREADS = Int(1, 1024)
FINITE = Float()
NON_NEGATIVE_FLOAT = Float(0.0)
POSITIVE_FLOAT = Float(0.0, low_open=True)
UNIT = Float(0.0, 1.0, low_open=True)  # (0, 1]: --strength, --truncation
SIGMA = Float(0.0, allow_inf=True)  # a noise level in [0, inf]: --guidance-interval
