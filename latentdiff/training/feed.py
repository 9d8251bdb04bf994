"""An endless, resumable stream of training batches over the epochs of the shard reader.

The position is ``(epoch, samples this rank received in the epoch)``, the reader's resume contract
(:mod:`latentdiff.data.reader`): a stream rebuilt at a saved position yields exactly the batches the
interrupted stream would have yielded next. Data problems (undecodable or missing samples) are counted across
epochs and resumes, and stop training when their share passes ``data.max_error_rate``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from latentdiff.data.reader import make_dataloader
from latentdiff.data.stats import DataStats


class BatchFeed:
    def __init__(self, data_cfg, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        self.cfg = data_cfg
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.epoch = 0
        self.position = 0
        self.stats = DataStats()
        self.fingerprint: str | None = None
        self._iter: Iterator[dict] | None = None

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter)  # the reader never draws on the global RNG (its DataLoader has its own generator)

    def __iter__(self) -> BatchFeed:
        return self

    def _batches(self) -> Iterator[dict]:
        empty_epochs = 0
        while True:
            loader = make_dataloader(self.cfg, rank=self.rank, world_size=self.world_size, epoch=self.epoch,
                                     start_index=self.position, stats=self.stats, pin_memory=self.pin_memory)
            self.fingerprint = loader.order_fingerprint
            if loader.batches_per_epoch == 0:
                raise ValueError(f"the shards {self.cfg.shards!r} give no full batch of {self.cfg.batch_size} per "
                                 f"rank for {self.world_size} rank(s); use more data or a smaller data.batch_size")
            got = False
            for batch in loader:
                self.position = loader.position
                got = True
                yield batch
            empty_epochs = 0 if got else empty_epochs + 1
            if empty_epochs > 1:  # only the (already finished) resumed epoch may be empty
                raise RuntimeError("the data loader yielded no batch for a whole epoch")
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint or "",
                "samples_ok": self.stats.samples_ok, "problems": dict(self.stats.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.stats.samples_ok = int(state["samples_ok"])
        self.stats.counts.update(state["problems"])
        self._iter = None
        saved = state.get("fingerprint")
        if saved:
            current = make_dataloader(self.cfg, rank=self.rank, world_size=self.world_size, epoch=self.epoch,
                                      start_index=0, stats=DataStats()).order_fingerprint
            if current != saved:
                print("warning: the data (shards, data config or world size) differs from the checkpoint's; the "
                      "resumed run continues at the same (epoch, position) of a different sample order",
                      file=sys.stderr)
