import pytest

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


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = LatentDiffusionConfig()
    assert config_from_json(config_to_json(cfg)) == cfg
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


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
    (tmp_path / "bad.yaml").write_text("unet: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    assert to_dict(LatentDiffusionConfig())["schedule"]["num_timesteps"] == 1000
