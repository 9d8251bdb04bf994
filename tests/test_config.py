import re

import pytest
import yaml

from latentdiff.config import (
    LatentDiffusionConfig,
    ScheduleConfig,
    UNetConfig,
    apply_overrides,
    config_from_json,
    config_to_json,
    load_config,
    model_config_from_dict,
    save_config,
    to_dict,
)
from tests.tiny import tiny_ldm_config


def test_defaults_validate_and_round_trip(tmp_path):
    default = LatentDiffusionConfig()
    assert to_dict(default)["schedule"]["num_timesteps"] == 1000 and default.image_size == 512
    # a config unlike the defaults in every section: a serialiser that dropped fields would read back defaults
    cfg = tiny_ldm_config(schedule={"num_timesteps": 100, "prediction_type": "v_prediction"})
    assert cfg != default and cfg.unet != default.unet and cfg.autoencoder != default.autoencoder
    assert cfg.text_encoder != default.text_encoder and cfg.schedule != default.schedule
    assert config_from_json(config_to_json(cfg)) == cfg
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["unet"]["model_channels"] == 32


def test_dotted_overrides_and_unknown_keys(tmp_path):
    save_config(LatentDiffusionConfig(), tmp_path / "c.yaml")
    cfg = load_config(tmp_path / "c.yaml", ["unet.model_channels=64", "unet.channel_mult=[1,2]",
                                               "unet.attention_resolutions=[2]", "image_size=256"])
    assert cfg.unet.model_channels == 64 and cfg.unet.channel_mult == [1, 2] and cfg.image_size == 256
    with pytest.raises(ValueError, match="unknown key 'unet.nope'"):
        load_config(tmp_path / "c.yaml", ["unet.nope=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['unet.bogus'\]"):
        model_config_from_dict({"unet": {"bogus": 1}})


@pytest.mark.parametrize("bad, message", [
    ({"beta_schedule": "quadratic"}, "beta_schedule='quadratic'"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start"),
    ({"prediction_type": "score"}, "prediction_type='score'"),
    ({"timestep_spacing": "random"}, "timestep_spacing='random'"),
])
def test_schedule_validation_names_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**bad)


def test_unet_and_model_validation():
    with pytest.raises(ValueError, match="exactly one of"):
        UNetConfig(num_heads=8, num_head_channels=64)
    with pytest.raises(ValueError, match="attention_resolutions entry 16"):
        UNetConfig(attention_resolutions=[16])
    with pytest.raises(ValueError, match="context_dim=768 must equal text_encoder.width=512"):
        model_config_from_dict({"text_encoder": {"width": 512, "heads": 8}})
    with pytest.raises(ValueError, match="must be an integer"):
        model_config_from_dict({"image_size": "big"})
    with pytest.raises(ValueError, match="type='gan'"):
        model_config_from_dict({"type": "gan"})


def test_bad_yaml_is_a_value_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML") as e:
        load_config(bad)
    assert not isinstance(e.value, yaml.YAMLError) and str(bad) in str(e.value)  # a ValueError naming the file
    assert e.value.__suppress_context__  # one message, not the parser's traceback chained under it
    listed = tmp_path / "list.yaml"
    listed.write_text("- unet\n- autoencoder\n")  # valid YAML, but not a mapping
    with pytest.raises(ValueError, match=re.escape(f"config {listed} must hold a YAML mapping")):
        load_config(listed)


def test_unreadable_config_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"cannot read config {tmp_path / 'missing.yaml'}")):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes("image_size: 32 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == LatentDiffusionConfig()  # an empty file is all defaults


def test_default_sampler_and_steps_are_validated():
    from latentdiff.config.model import SAMPLER_NAMES, VQ_SAMPLER_NAMES
    from latentdiff.diffusion.samplers import SAMPLERS
    from latentdiff.pipelines.vq import VQ_SAMPLERS

    assert set(SAMPLER_NAMES) == set(SAMPLERS)  # config keeps its own copy of the names (no import upward)
    assert set(VQ_SAMPLER_NAMES) == set(VQ_SAMPLERS) and not set(VQ_SAMPLERS) & set(SAMPLERS)
    cfg = tiny_ldm_config(sampler="euler_a", steps=10)
    assert (cfg.sampler, cfg.steps) == ("euler_a", 10) and config_from_json(config_to_json(cfg)) == cfg
    with pytest.raises(ValueError, match="sampler='plms' is not one of"):
        tiny_ldm_config(sampler="plms")
    with pytest.raises(ValueError, match="steps=101 must be between 1 and schedule.num_timesteps=100"):
        tiny_ldm_config(steps=101)
    with pytest.raises(ValueError, match="steps=0"):
        tiny_ldm_config(steps=0)


def test_stored_config_without_sampler_and_steps_gets_the_defaults(tiny_ldm_file, tmp_path):
    """Model files written before the config had sampler and steps load with DDIM in 25 steps."""
    import json

    from safetensors.torch import save_file

    from latentdiff.io.checkpoint import load_model_file, read_safetensors

    tensors, metadata = read_safetensors(tiny_ldm_file)
    stored = json.loads(metadata["config"])
    del stored["sampler"], stored["steps"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**metadata, "config": json.dumps(stored)})
    cfg = load_model_file(old)[0]
    assert (cfg.sampler, cfg.steps) == ("ddim", 25)
