"""Error accounting for shard reading and validation: every bad sample or shard is counted and named.

Nothing is dropped silently. A :class:`Problem` names its kind, shard and key; :class:`DataStats` counts problems
by kind, keeps the first ``max_problems`` of them, logs the first ``max_logged`` as warnings, and
:meth:`DataStats.check` raises :class:`DataError` once the share of failed samples passes ``max_error_rate``.

Per-sample problems (they count toward the error rate; each stands for one position of the epoch):

    decode_error      the image (or latent) member cannot be decoded: corrupt or truncated bytes
    missing_caption   the sample has no ``.txt`` member
    missing_image     the sample has no image (``decode.IMAGE_EXTS``) or latent (``npy``) member
    missing_sample    a position the shard's manifest count promises but the shard did not deliver

Shard problems (reported; the positions they lose are counted as ``missing_sample``):

    truncated_shard   the tar ends inside a member or has a broken header
    short_shard       the tar ends cleanly with fewer samples than its manifest count
    extra_samples     the tar holds more samples than its manifest count (the extra ones are not read)
    empty_shard       the shard holds no sample
    unreadable_shard  the shard cannot be opened (missing file, permissions)

Validation against a manifest adds ``missing_shard``, ``unlisted_shard``, ``size_mismatch`` and
``checksum_mismatch`` (see :mod:`latentdiff.data.validate`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass

logger = logging.getLogger("latentdiff.data")

SAMPLE_ERRORS = ("decode_error", "missing_caption", "missing_image", "missing_sample")


class DataError(RuntimeError):
    """Too many bad samples (the error rate passed ``max_error_rate``), or a batch with no usable sample."""


@dataclass(frozen=True)
class Problem:
    kind: str
    shard: str
    key: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = self.shard if self.key is None else f"{self.shard} key {self.key}"
        return f"{self.kind}: {where}" + (f": {self.detail}" if self.detail else "")


class DataStats:
    """Counters of good samples and of problems by kind, plus the first ``max_problems`` problems."""

    def __init__(self, max_problems: int = 100, max_logged: int = 20):
        self.max_problems = max_problems
        self.max_logged = max_logged
        self.samples_ok = 0
        self.counts: Counter[str] = Counter()
        self.problems: list[Problem] = []
        self._logged = 0

    def add_ok(self, n: int = 1) -> None:
        self.samples_ok += n

    def add(self, problem: Problem, log: bool = True) -> None:
        self.counts[problem.kind] += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(problem)
        if log:
            self._log(problem)

    def _log(self, problem: Problem) -> None:
        if self._logged < self.max_logged:
            logger.warning("data problem %s", problem)
        elif self._logged == self.max_logged > 0:
            logger.warning("further data problems are counted but not logged (see DataStats)")
        self._logged += 1

    @property
    def sample_errors(self) -> int:
        return sum(self.counts[k] for k in SAMPLE_ERRORS)

    @property
    def samples_seen(self) -> int:
        return self.samples_ok + self.sample_errors

    @property
    def error_rate(self) -> float:
        return self.sample_errors / self.samples_seen if self.samples_seen else 0.0

    @property
    def ok(self) -> bool:
        return not self.counts

    def check(self, max_error_rate: float, final: bool = False, min_samples: int = 100) -> None:
        """Raise :class:`DataError` when the error rate exceeds ``max_error_rate``.

        Mid-stream the rate is only judged after ``min_samples`` samples (a first bad sample is not 100%);
        ``final=True`` judges it whatever the count.
        """
        if (final or self.samples_seen >= min_samples) and self.error_rate > max_error_rate:
            raise DataError(f"data error rate {self.error_rate:.2%} exceeds max_error_rate={max_error_rate:.2%}; "
                            f"{self.summary()}")

    def summary(self, max_listed: int = 10) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "no problems"
        text = f"{self.samples_ok} good samples, {counts}"
        if self.problems:
            listed = "; ".join(str(p) for p in self.problems[:max_listed])
            more = len(self.problems) - max_listed
            text += f"; first problems: {listed}" + (f" (+{more} more kept)" if more > 0 else "")
        return text

    def to_dict(self) -> dict:
        return {"samples_ok": self.samples_ok, "counts": dict(self.counts),
                "problems": [asdict(p) for p in self.problems]}
