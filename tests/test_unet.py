"""U-Net: shapes, input validation, equality with diffusers' UNet2DConditionModel, key/config conversion."""

import pytest
import torch

from latentdiff.config import UNetConfig
from latentdiff.io.convert_unet import (
    extract_unet_state_dict,
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from latentdiff.models.unet import UNetModel
from tests.tiny import random_weights

diffusers = pytest.importorskip("diffusers")

# SD-1-like: 1x1-conv projections, fixed head count, no attention at the lowest resolution, 2 res blocks.
SD1_TINY = UNetConfig(model_channels=16, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 1],
                      num_heads=2, context_dim=12, norm_num_groups=8)
# SD-2-like: linear projections, fixed head width, depth-2 transformers, 1 res block.
SD2_TINY = UNetConfig(model_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[2, 1],
                      num_heads=None, num_head_channels=8, context_dim=12, use_linear_in_transformer=True,
                      transformer_depth=2, norm_num_groups=8)
TINY = pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])

SD15_DIFFUSERS = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_DIFFUSERS = {**SD15_DIFFUSERS, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                  "use_linear_projection": True, "upcast_attention": True, "sample_size": 96,
                  "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False}
SD21_CFG = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)


def inputs(cfg: UNetConfig, B: int = 2, size: int = 8, L: int = 5):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(B, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([3, 977][:B])
    return x_t, t, torch.randn(B, L, cfg.context_dim, generator=g)


def diffusers_unet(cfg: UNetConfig):
    return diffusers.UNet2DConditionModel(**unet_config_to_diffusers(cfg))


@TINY
def test_output_shape_and_dtype(cfg):
    x_t, t, context = inputs(cfg)
    out = UNetModel(cfg)(x_t, t, context)
    assert out.shape == (2, cfg.out_channels, 8, 8) and out.dtype == x_t.dtype


@TINY
def test_matches_diffusers_with_converted_weights(cfg):
    theirs = random_weights(diffusers_unet(cfg), std=0.2).eval()
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(unet_state_dict_from_diffusers(theirs.state_dict(), cfg), strict=True)
    x_t, t, context = inputs(cfg)
    with torch.no_grad():
        expected = theirs(x_t, t, context).sample
        out = ours(x_t, t, context)
        assert expected.abs().max() > 0.1  # not a trivially zero output
        assert (out - expected).abs().max().item() <= 1e-4
        # the other direction: our random weights converted into diffusers
        random_weights(ours, std=0.2, seed=3)
        theirs.load_state_dict(unet_state_dict_to_diffusers(ours.state_dict(), cfg), strict=True)
        assert (ours(x_t, t, context) - theirs(x_t, t, context).sample).abs().max().item() <= 1e-4


@TINY
def test_parameter_count_and_round_trip(cfg):
    ours, theirs = UNetModel(cfg), diffusers_unet(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    sd = ours.state_dict()
    converted = unet_state_dict_to_diffusers(sd, cfg)
    assert set(converted) == set(theirs.state_dict())
    back = unet_state_dict_from_diffusers(converted, cfg)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@TINY
def test_config_conversions_recover_the_config(cfg):
    assert unet_config_from_diffusers(dict(diffusers_unet(cfg).config)) == cfg
    heads = {"num_heads": cfg.num_heads} if cfg.num_heads else {"num_head_channels": cfg.num_head_channels}
    sd = UNetModel(cfg).state_dict()
    assert unet_config_from_state_dict(sd, norm_num_groups=8, **heads) == cfg
    prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()} | {"first_stage_model.x": torch.zeros(1)}
    assert unet_config_from_state_dict(prefixed, norm_num_groups=8, **heads) == cfg
    assert list(extract_unet_state_dict(prefixed)) == list(sd)


def test_stable_diffusion_configs_and_layouts():
    """Full-size SD 1.5 / 2.1 on the meta device: configs, parameter counts and names against diffusers."""
    assert unet_config_from_diffusers(SD15_DIFFUSERS) == UNetConfig()
    assert unet_config_from_diffusers(SD21_DIFFUSERS) == SD21_CFG
    for cfg, n_params in [(UNetConfig(), 859_520_964), (SD21_CFG, 865_910_724)]:
        with torch.device("meta"):
            ours, theirs = UNetModel(cfg), diffusers_unet(cfg)
        sd = ours.state_dict()
        assert sum(p.numel() for p in ours.parameters()) == n_params
        converted, reference = unet_state_dict_to_diffusers(sd, cfg), theirs.state_dict()
        assert set(converted) == set(reference)
        assert all(converted[k].shape == reference[k].shape for k in reference)
        assert {"output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "input_blocks.3.0.op.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_out.weight"} <= set(sd)
        assert unet_config_from_state_dict(sd) == cfg  # SD default head layouts from the context width


def test_projection_weights_are_reshaped_between_conv_and_linear():
    conv_sd = unet_state_dict_to_diffusers(UNetModel(SD1_TINY).state_dict(), SD1_TINY)
    linear_cfg = UNetConfig(**{**vars(SD1_TINY), "use_linear_in_transformer": True})
    converted = unet_state_dict_from_diffusers(conv_sd, linear_cfg)
    assert converted["middle_block.1.proj_in.weight"].shape == (32, 32)
    UNetModel(linear_cfg).load_state_dict(converted, strict=True)


def test_unsupported_diffusers_configs_are_errors():
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet_config_from_diffusers({**SD15_DIFFUSERS, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="up_block_types"):
        unet_config_from_diffusers({**SD15_DIFFUSERS, "up_block_types": ["UpBlock2D"] * 4})
    with pytest.raises(ValueError, match="do not fit"):
        unet_state_dict_from_diffusers({"add_embedding.linear_1.weight": torch.zeros(1)}, SD1_TINY)


@pytest.mark.parametrize("bad, match", [
    (dict(x_t=torch.randn(2, 4, 6, 8)), "multiple of the U-Net downsampling factor 4"),
    (dict(x_t=torch.randn(2, 3, 8, 8)), "x_t must have shape"),
    (dict(context=torch.randn(2, 5, 7)), "context must have shape"),
    (dict(context=None), "context must have shape"),
    (dict(t=torch.tensor([1, 2, 3])), "t must be a scalar"),
])
def test_bad_inputs_raise_value_error(bad, match):
    model = UNetModel(SD1_TINY)
    x_t, t, context = inputs(SD1_TINY)
    kwargs = {"x_t": x_t, "t": t, "context": context, **bad}
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_scalar_and_float_timesteps_broadcast():
    model = random_weights(UNetModel(SD1_TINY), std=0.2).eval()
    x_t, _, context = inputs(SD1_TINY)
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, 500, context), model(x_t, torch.tensor([500.0, 500.0]), context))


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    import latentdiff.models.unet as unet_module

    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    cfg = UNetConfig(**{**vars(SD2_TINY), "gradient_checkpointing": True})
    models = [random_weights(UNetModel(SD2_TINY), std=0.2).train(), UNetModel(cfg).train()]
    models[1].load_state_dict(models[0].state_dict())
    x_t, t, context = inputs(SD2_TINY)
    grads = []
    for model in models:
        model(x_t, t, context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])
    n_blocks = len(models[1].input_blocks) + 1 + len(models[1].output_blocks)
    assert len(calls) == n_blocks and all(c == {"use_reentrant": False} for c in calls)
    with torch.no_grad():
        models[1](x_t, t, context)  # no checkpointing without gradients
    assert len(calls) == n_blocks


def test_patch_size_runs_the_unet_on_the_patched_grid():
    """p = 2: the same network as a p = 1 U-Net with 4x the channels on pixel-unshuffled input, shuffled back."""
    patched = random_weights(UNetModel(UNetConfig(**{**vars(SD1_TINY), "patch_size": 2})), std=0.2).eval()
    plain = UNetModel(UNetConfig(**{**vars(SD1_TINY), "in_channels": 16, "out_channels": 16})).eval()
    plain.load_state_dict(patched.state_dict())  # the same parameter names and shapes
    x_t, t, context = inputs(SD1_TINY, size=16)
    with torch.no_grad():
        out = patched(x_t, t, context)
        assert out.shape == x_t.shape
        torch.testing.assert_close(out, torch.nn.functional.pixel_shuffle(
            plain(torch.nn.functional.pixel_unshuffle(x_t, 2), t, context), 2))
        torch.testing.assert_close(patched.forward_deepcache(x_t, t, context, branch=1)[0], out)
    assert patched.cfg.downsample_factor == 8
    with pytest.raises(ValueError, match="multiple of the U-Net downsampling factor 8"):
        patched(inputs(SD1_TINY, size=12)[0], t, context)
    with pytest.raises(ValueError, match="no diffusers equivalent"):
        unet_config_to_diffusers(patched.cfg)
    with pytest.raises(ValueError, match="patch_size"):
        UNetConfig(patch_size=0)
