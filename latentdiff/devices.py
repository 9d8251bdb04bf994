"""Device and precision choice, one meaning everywhere (txt2img, evaluation, training).

``device="auto"`` is CUDA when available, else the CPU. ``precision="auto"`` is bfloat16 on a CUDA device that
supports it, else float16 on CUDA, and float32 on the CPU (and on other devices).
"""

from __future__ import annotations

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """A torch device from a name (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``); ``ValueError`` if unusable."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a device torch knows: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) on ``device``."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {['auto', *PRECISIONS]}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is not supported on the CPU; use fp32 or bf16")
    return PRECISIONS[precision]
