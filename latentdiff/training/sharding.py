"""Sharded data parallelism (``distributed.strategy: fsdp``): PyTorch FSDP2 around the trainable networks, and the
state dicts that checkpoints and the export read from sharded weights.

Sharding (``fully_shard``, FSDP2). Each trainable network (``objective.trainable`` of a latent-diffusion run: the
U-Net and a trained text encoder; other objectives are refused, see :data:`FSDP_OBJECTIVES`) becomes its own FSDP
root, and inside it every block whose name matches :data:`SHARD_UNITS` (U-Net ``input_blocks.i``,
``middle_block``, ``output_blocks.i``; the text encoder's ``blocks.i``) is a unit of its own: its weights are
gathered just before its forward and freed after it (``reshard_after_forward``), gradients are reduce-scattered
per unit. Frozen networks (the autoencoder) stay whole on every rank. Parameters become ``DTensor`` shards (dim 0 split
over the R ranks); optimizers, gradient clipping (``clip_grad_norm_`` reduces the norm over the shards) and the
EMA (each rank averages its own shard) work on them unchanged.

Mixed precision: under bf16/fp16 the gathered weights are cast to that dtype for compute
(``MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=float32)``), while the shards, the optimizer and gradient
reduction stay in float32; under fp32 nothing is cast.

A world of one process runs unsharded (with one warning line): there is nothing to shard across.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from latentdiff.models.text import TextEncoder

# Submodules (names inside a trainable network) that become FSDP units of their own; each is called through its
# forward, which FSDP's hooks need.
SHARD_UNITS = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+|blocks\.\d+)$")
# Objectives whose trainable networks only ever run through forward (a text encoder's encode, which calls forward,
# is registered with FSDP): what FSDP needs. The others read weights outside forward: the VQ-Diffusion objective
# the transformer's null_context, the autoencoder objectives encode_posterior/encode_to_codes/decode_codes, which
# forward also calls (a registered method nested in forward would reshard the weights forward still needs).
FSDP_OBJECTIVES = ("latent_diffusion",)


def use_fsdp(cfg, dist) -> bool:
    """True when this run shards: ``distributed.strategy: fsdp`` and more than one rank. One rank: warn, run plain.
    A LoRA run is refused (its adapters live inside the frozen U-Net's layers, and are small: use ddp), and so
    are objectives outside :data:`FSDP_OBJECTIVES` and optimizers other than AdamW (untested on DTensors)."""
    if cfg.distributed.strategy != "fsdp":
        return False
    if cfg.objective.type not in FSDP_OBJECTIVES:
        raise ValueError(f"distributed.strategy=fsdp shards {', '.join(FSDP_OBJECTIVES)} runs; objective.type="
                         f"{cfg.objective.type!r} reads its networks' weights outside their forward, which FSDP "
                         f"cannot gather: use distributed.strategy=ddp")
    if getattr(cfg.objective, "lora", None) is not None:
        raise ValueError("distributed.strategy=fsdp does not shard LoRA runs (the adapters sit inside frozen "
                         "layers, and are small); use distributed.strategy=ddp")
    optimizer = getattr(cfg.optim, "optimizer", "adamw")
    if optimizer != "adamw":  # 8-bit AdamW quantises whole tensors, Adafactor factors over whole rows and columns
        raise ValueError(f"distributed.strategy=fsdp trains with optim.optimizer=adamw only (sharded parameters are "
                         f"DTensors), not {optimizer!r}; use distributed.strategy=ddp for {optimizer}")
    if not dist.enabled:
        print("warning: distributed.strategy=fsdp with one process: training unsharded (start several ranks with "
              "torchrun --nproc_per_node N to shard)", file=sys.stderr)
        return False
    return True


def shard_trainable(objective: nn.Module, amp_dtype: torch.dtype, dist_cfg, device: torch.device) -> None:
    """``fully_shard`` every trainable network of ``objective`` in place: its :data:`SHARD_UNITS` blocks first
    (FSDP2 wants children before parents), then the network itself. ``cpu_offload`` keeps the shards in (pinned,
    when training on CUDA) CPU memory; FSDP copies them to ``device`` for each block's compute."""
    if amp_dtype == torch.float32:
        mp_policy = MixedPrecisionPolicy()
    else:
        mp_policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp_policy, "reshard_after_forward": dist_cfg.reshard_after_forward}
    if dist_cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for module in objective.trainable.values():
        for name, child in list(module.named_modules()):
            if SHARD_UNITS.match(name):
                fully_shard(child, **kwargs)
        fully_shard(module, **kwargs)
        if isinstance(module, TextEncoder):
            register_fsdp_forward_method(module, "encode")  # tokens -> forward: gathered like forward


@contextlib.contextmanager
def no_gradient_sync(modules) -> Iterator[None]:
    """FSDP's analogue of DDP's ``no_sync``: accumulate unreduced gradients over micro-batches; the micro-batch
    after this context reduce-scatters their sum."""
    for m in modules:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` (scale gradients so their global 2-norm is at most ``max_norm``; returns the norm before
    clipping). With ``DTensor`` gradients the norm is the one over all shards (DTensor reduces the partial sums), and
    is returned as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------------------------------------------
# state dicts for DCP checkpoints and the export
# ----------------------------------------------------------------------------------------------------------------


def tensor_state(trainable: dict[str, nn.Module], optimizers: dict, ema) -> tuple[dict, list[str]]:
    """The tensors of a sharded checkpoint (DTensor shards under FSDP, whole tensors otherwise) and the names of
    the optimizers left out because they have no state yet (an idle discriminator: DCP would initialise it, which
    changes the run). Keys are module-qualified names, so DCP can reshard them into another world size."""
    holder = nn.ModuleDict(trainable)
    state = {"modules": {n: get_model_state_dict(m) for n, m in trainable.items()}, "optimizers": {}}
    empty = []
    for name, opt in optimizers.items():
        if opt.state:
            state["optimizers"][name] = get_optimizer_state_dict(holder, opt)
        else:
            empty.append(name)
    if ema is not None:
        state["ema"] = dict(ema.shadow)
    return state, empty


def load_tensor_state(path: Path, trainable: dict[str, nn.Module], optimizers: dict, ema,
                      empty: list[str]) -> None:
    """Read a sharded checkpoint folder into the live modules, optimizers and EMA of a fresh run (every rank; any
    world size: DCP reads each rank's part of every tensor, whatever sharding wrote it). ``empty``: the optimizers
    saved without state. Adam's state of a parameter that had none when saved (it never got a gradient) stays
    absent, as it was; a model or EMA tensor the folder lacks is an error."""
    holder = nn.ModuleDict(trainable)
    state = {"modules": {n: get_model_state_dict(m) for n, m in trainable.items()},
             "optimizers": {n: get_optimizer_state_dict(holder, o)  # (initialises Adam's state: one step at lr 0)
                            for n, o in optimizers.items() if n not in empty}}
    if ema is not None:
        state["ema"] = dict(ema.shadow)
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    needed = [f"modules.{n}.{k}" for n, sd in state["modules"].items() for k in sd]
    missing = sorted(k for k in needed + [f"ema.{k}" for k in state.get("ema", {})] if k not in saved)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors this run needs, e.g. {missing[:3]}")
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True),
             no_dist=not torch.distributed.is_initialized())
    for name, module in trainable.items():
        set_model_state_dict(module, state["modules"][name])
    for name, osd in state["optimizers"].items():
        prefix = f"optimizers.{name}.state."  # DCP's flat names: optimizers.<name>.state.<fqn>.<exp_avg|...>
        had_state = {k[len(prefix):].rsplit(".", 1)[0] for k in saved if k.startswith(prefix)}
        osd["state"] = {fqn: v for fqn, v in osd["state"].items() if fqn in had_state}
        set_optimizer_state_dict(holder, optimizers[name], osd, options=StateDictOptions(strict=False))


def full_state_dicts(modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Whole (unsharded) state dicts of sharded networks, gathered on the CPU of rank 0 (other ranks get empty
    dicts). Every rank must call this (it all-gathers)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: get_model_state_dict(m, options=options) for name, m in modules.items()}
