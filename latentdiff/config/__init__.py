"""Typed configuration for every component.

Each component has a dataclass validated in ``__post_init__`` (a ``ValueError`` names the bad value).
A whole model is a :class:`LatentDiffusionConfig` or :class:`VQDiffusionConfig`; YAML files map onto them
through :data:`MODEL_CONFIGS`, keyed by their ``type`` field (no import-path strings). A training run is a
:class:`TrainConfig`.

    cfg = load_config("latentdiff/assets/configs/sd15.yaml", overrides=["unet.model_channels=64"])
    save_config(cfg, "resolved.yaml")

Unknown keys, in files or in dotted overrides, are errors. The package has four parts: ``model`` (model
schemas), ``train`` (training schemas), ``coerce`` (dict <-> dataclass, overrides) and ``files`` (YAML/JSON).
"""

from latentdiff.config.coerce import apply_overrides, from_dict, to_dict
from latentdiff.config.files import (
    config_from_json,
    config_to_json,
    load_config,
    load_train_config,
    read_yaml,
    save_config,
)
from latentdiff.config.model import (
    MODEL_CONFIGS,
    AutoencoderKLConfig,
    DiscreteScheduleConfig,
    LatentDiffusionConfig,
    ScheduleConfig,
    TextEncoderConfig,
    UNetConfig,
    VQDiffusionConfig,
    VQModelConfig,
    VQTransformerConfig,
    model_config_from_dict,
)
from latentdiff.config.train import (
    OBJECTIVE_CONFIGS,
    AutoencoderKLObjectiveConfig,
    DataConfig,
    DistributedConfig,
    EMAConfig,
    LatentDiffusionObjectiveConfig,
    OptimConfig,
    TrainConfig,
    VQDiffusionObjectiveConfig,
    VQVAEObjectiveConfig,
    train_config_from_dict,
)

__all__ = [
    "MODEL_CONFIGS", "OBJECTIVE_CONFIGS", "AutoencoderKLConfig", "AutoencoderKLObjectiveConfig", "DataConfig",
    "DiscreteScheduleConfig", "DistributedConfig", "EMAConfig", "LatentDiffusionConfig",
    "LatentDiffusionObjectiveConfig", "OptimConfig", "ScheduleConfig", "TextEncoderConfig", "TrainConfig",
    "UNetConfig", "VQDiffusionConfig", "VQDiffusionObjectiveConfig", "VQModelConfig", "VQTransformerConfig",
    "VQVAEObjectiveConfig", "apply_overrides", "config_from_json", "config_to_json", "from_dict", "load_config",
    "load_train_config", "model_config_from_dict", "read_yaml", "save_config", "to_dict", "train_config_from_dict",
]
