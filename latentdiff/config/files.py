"""Config files: YAML in (strict dotted overrides), YAML out (atomically), and the JSON stored in model files.

    cfg = load_config("latentdiff/assets/configs/sd15.yaml", overrides=["unet.model_channels=64"])
    train_cfg = load_train_config("configs/cifar10_ldm.yaml", overrides=["optim.lr=3e-4"])
    save_config(train_cfg, "runs/x/config.yaml")
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from latentdiff.atomic import atomic_write
from latentdiff.config.coerce import apply_overrides, to_dict
from latentdiff.config.model import model_config_from_dict
from latentdiff.config.train import TrainConfig, train_config_from_dict


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file (an empty file is ``{}``); ``ValueError`` naming the file otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config {path} is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a YAML mapping (key: value lines), got a {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None):
    """Read a model config from YAML, apply dotted overrides (after filling in defaults), validate."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(to_dict(model_config_from_dict(data)), overrides)
    return model_config_from_dict(data)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training config from YAML, fill in defaults, apply strict dotted overrides
    (``optim.lr=3e-4``, ``model.unet.model_channels=64``), validate."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(to_dict(train_config_from_dict(data)), overrides)
    return train_config_from_dict(data)


def save_config(cfg, path: str | Path, overwrite: bool = True) -> Path:
    """Write a config as YAML, atomically (readable back by :func:`load_config` / :func:`load_train_config`)."""
    with atomic_write(path, "w", overwrite=overwrite) as f:
        f.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return Path(path)


def config_to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def config_from_json(text: str):
    return model_config_from_dict(json.loads(text))
