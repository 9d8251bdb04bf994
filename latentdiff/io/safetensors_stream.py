"""Read and write ``.safetensors`` tensor by tensor, so that big checkpoints are never held twice in RAM.

safetensors' own loader memory-maps the file and copies each tensor out of the map: the touched pages count in
the process' resident memory next to the copies, so reading a 2 GB file peaks near 4 GB. Its writer builds the
whole file as one ``bytes`` object first. Here, reading lists the keys from the header and reads only the tensors
asked for, straight into their own memory (``readinto``); writing streams each tensor to the file object.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (padded with spaces),
then the tensor bytes, little-endian, at the offsets, covering the rest of the file exactly.

    source = TensorSource("model.safetensors")      # or a .ckpt: torch.load(weights_only=True, mmap=True)
    unet = {k: source.get(k) for k in source.keys() if k.startswith("model.diffusion_model.")}
    write_safetensors(f, tensors, metadata={"format": "pt"})
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from latentdiff.io.checkpoint import PICKLE_SUFFIXES, CheckpointError, read_pickle_checkpoint

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class TensorSource:
    """The tensors of one checkpoint file, keys first and tensors on demand.

    ``.safetensors`` is parsed and validated up front (a truncated or corrupt file is refused with a clear
    message); pickle-based files (``.ckpt``/``.pt``/``.bin``) go through ``torch.load(weights_only=True)``
    (memory-mapped when the file is a zip archive) and a nested ``state_dict`` is unwrapped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint {self.path} does not exist" if not self.path.exists()
                                  else f"checkpoint {self.path} is not a file")
        self._tensors: dict[str, torch.Tensor] | None = None
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self.metadata: dict[str, str] = {}
        if self.path.suffix == ".safetensors":
            self._read_header()
        elif self.path.suffix in PICKLE_SUFFIXES:
            obj = read_pickle_checkpoint(self.path)
            state = obj.get("state_dict", obj)
            if not isinstance(state, dict):
                raise CheckpointError(f"{self.path}: 'state_dict' is a {type(state).__name__}, expected a dict")
            self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        else:
            raise CheckpointError(f"{self.path}: unsupported checkpoint type {self.path.suffix!r}; expected "
                                  f".safetensors or one of {list(PICKLE_SUFFIXES)}")

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a readable .safetensors file (truncated or corrupt?): {why}")

    def _read_header(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise self._bad(f"the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise self._bad(f"header length {n} does not fit in a {size}-byte file")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise self._bad(f"the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._bad("the header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        start, data_len, end_max = 8 + n, size - 8 - n, 0
        for key, info in header.items():
            try:
                dtype, shape = DTYPES[info["dtype"]], [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor {key!r} has an invalid header entry {info!r:.200}") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end or end - begin != nbytes:
                raise self._bad(f"tensor {key!r}: offsets {[begin, end]} do not hold {shape} {info['dtype']}")
            if end > data_len:
                raise self._bad(f"tensor {key!r} ends at byte {start + end} but the file has {size} bytes")
            self._entries[key] = (dtype, shape, start + begin, nbytes)
            end_max = max(end_max, end)
        if end_max != data_len:
            raise self._bad(f"the tensors cover {end_max} data bytes but the file has {data_len}")

    def keys(self) -> list[str]:
        return list(self._tensors if self._tensors is not None else self._entries)

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        dtype, shape, offset, nbytes = self._entries[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with open(self.path, "rb") as f:
                f.seek(offset)
                if f.readinto(memoryview(buf.numpy())) != nbytes:
                    raise self._bad(f"tensor {key!r} is cut short")
        return buf.view(dtype).reshape(shape)


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU, any layout) to the open binary file ``f`` in the safetensors format, one tensor at
    a time (tensors sharing memory are written once each, as separate copies)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    items = sorted(tensors.items())
    for key, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, t in items:
        if t.numel():
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
