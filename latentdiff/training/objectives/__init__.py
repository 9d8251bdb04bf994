"""One training objective per model kind, chosen by ``objective.type`` in the training config.

An :class:`Objective` is an ``nn.Module`` that owns the networks of one model kind (trainable and frozen), so the
trainer wraps it whole in ``DistributedDataParallel`` and runs one loop for every kind. The registry maps the
config ``type`` to the class; each objective module registers its class with :func:`register_objective` when
:func:`build_objective` imports it.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

OBJECTIVES: dict[str, type] = {}


def register_objective(name: str, cls: type) -> None:
    OBJECTIVES[name] = cls


class Objective(nn.Module):
    """What the trainer needs from a model kind.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`forward`,
    :meth:`sample_images` and :meth:`export`.

    - ``trainable``: name -> module whose weights are checkpointed (e.g. ``unet``, ``discriminator``).
    - ``ema_names``: the subset of ``trainable`` averaged by EMA and exported with the averaged weights.
    - ``frozen``: name -> module kept in eval mode without gradients (e.g. the autoencoder of latent diffusion).
    - ``find_unused_parameters``: True when some steps leave trainable parameters unused (DDP must know).
    """

    find_unused_parameters = False

    def __init__(self):
        super().__init__()
        self.trainable: dict[str, nn.Module] = {}
        self.ema_names: tuple[str, ...] = ()
        self.frozen: dict[str, nn.Module] = {}

    def add_text_encoder(self, text_encoder: nn.Module, trainable: bool, layer: str) -> None:
        """Register a conditioning text encoder as trained (optimised, EMA'd) or frozen. A trained encoder whose
        ``penultimate`` layer feeds the model leaves its last block without gradient, which DDP must know."""
        if trainable:
            self.trainable["text_encoder"] = text_encoder
        else:
            self.frozen["text_encoder"] = freeze(text_encoder)
        self.ema_names = tuple(self.trainable)
        self.find_unused_parameters = trainable and layer == "penultimate"

    def optimizer_params(self) -> dict[str, tuple[list[nn.Parameter], dict]]:
        """Optimizer name -> (parameters, AdamW overrides such as ``lr``/``betas``). Default: one optimizer."""
        params = [p for m in self.trainable.values() for p in m.parameters() if p.requires_grad]
        return {"main": (params, {})}

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen.values():
            module.eval()
        return self

    def prepare(self, batch: dict, dist) -> None:
        """Called once with the first batch of a fresh (not resumed) run, before its first step."""

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to minimise, detached scalar terms to log) for one micro-batch at optimizer step ``step``."""
        raise NotImplementedError

    def sample_images(self, batch: dict) -> tuple[torch.Tensor, int]:
        """``(images, cols)``: (N, 3, H, W) images in [-1, 1] showing progress (reconstructions, generations) and
        the number of grid columns that lays them out in rows of one kind."""
        raise NotImplementedError

    def export(self) -> tuple[object, dict[str, nn.Module]]:
        """(model config, component -> module) for ``save_model_file``, with the current weights."""
        raise NotImplementedError

    def export_files(self, outdir) -> list:
        """Files written beside the exported model in ``outdir`` (a LoRA run's adapters); returns their paths."""
        return []

    def init_from_file(self, path: str) -> list[str]:
        """Fine-tuning (``init_from``): load the components of the model file ``path`` into the networks that
        :meth:`export` names, matched by component name, so a file of the same kind fits, and so does a larger one
        that holds them (the ``autoencoder`` of a full latent-diffusion file for an autoencoder run). Every exported
        component must be in the file with matching shapes (``CheckpointError`` otherwise); trainable networks
        outside the export (a discriminator) keep their fresh initialisation. Returns the loaded names."""
        from latentdiff.io.checkpoint import CheckpointError, load_into, load_model_file

        file_cfg, parts, _ = load_model_file(path)
        _, modules = self.export()
        missing = sorted(set(modules) - set(parts))
        if missing:
            raise CheckpointError(f"init_from={path} holds no {missing} weights (its components: {sorted(parts)})")
        for name, module in modules.items():
            load_into(module, parts[name], f"{name} of init_from={path}")
        self.adopt_file_config(file_cfg)
        return sorted(modules)

    def adopt_file_config(self, file_cfg) -> None:
        """What :meth:`init_from_file` takes from the file's config beyond weights (default: nothing)."""

    def extra_state(self) -> dict:
        """Plain values (no tensors needed) that the objective learned and must survive a resume."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Inverse of :meth:`extra_state`."""


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_objective(train_cfg) -> Objective:
    """The objective named by ``train_cfg.objective.type``, with its networks built on the CPU.

    The objective of type ``name`` lives in ``latentdiff/training/objectives/<name>.py``, which registers it
    when imported (the type was already checked against the config registry, ``OBJECTIVE_CONFIGS``).
    """
    kind = train_cfg.objective.type
    if kind not in OBJECTIVES:
        module = f"{__name__}.{kind}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    if kind not in OBJECTIVES:
        raise ValueError(f"objective.type={kind!r} has no objective; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[kind](train_cfg)


def check_model_config(train_cfg, cls: type) -> None:
    """Objectives train parts of one model kind: refuse a ``model`` config of another kind."""
    if not isinstance(train_cfg.model, cls):
        raise ValueError(f"objective.type={train_cfg.objective.type!r} trains a {cls.__name__} model, but "
                         f"model.type is {train_cfg.model.type!r}")

