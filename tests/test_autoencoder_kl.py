"""KL autoencoder: shapes, posterior closed forms, latent scale/shift, diffusers parity and key/config conversion."""

from __future__ import annotations

import pytest
import torch

from latentdiff.config import AutoencoderKLConfig
from latentdiff.io.convert_vae import (
    autoencoder_config_from_diffusers,
    autoencoder_config_from_state_dict,
    autoencoder_config_to_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from latentdiff.models.autoencoder_kl import AutoencoderKL, DiagonalGaussian

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, norm_num_groups=8, scaling_factor=0.5, shift_factor=0.25)
CONFIGS = {
    "sd_like": AutoencoderKLConfig(**TINY),
    "attn_levels": AutoencoderKLConfig(**TINY, attn_resolutions=[1, 2], z_channels=3, embed_dim=3),
    "no_mid_attn": AutoencoderKLConfig(**{**TINY, "num_res_blocks": 2}, mid_attention=False),
}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (GroupNorm affines included), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)  # ~ unit gain per layer
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _image(B=2, C=3, H=16, W=16, seed=1):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def _model(cfg: AutoencoderKLConfig) -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(cfg).eval()
    _randomize(model)
    return model


def test_shapes_and_training_pass():
    cfg = CONFIGS["sd_like"]
    model = _model(cfg)
    assert model.downsample_factor == 2 and model.latent_channels == 4
    x = _image(H=16, W=8)
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 4)
    assert model.decode(z).shape == (2, 3, 16, 8)
    recon, posterior = model.train()(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and posterior.mean.shape == (2, 4, 8, 4)
    ((recon - x).abs().mean() + 1e-6 * posterior.kl().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_posterior_closed_forms():
    moments = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(0)) * 2
    moments[0, 3, 0, 0], moments[1, 4, 1, 1] = 50.0, -50.0  # clamped logvars
    post = DiagonalGaussian(moments)
    mu, logvar = moments[:, :3], moments[:, 3:].clamp(-30, 20)
    assert post.logvar.max() == 20 and post.logvar.min() == -30
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), kl)
    normal = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    reference = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), reference, rtol=1e-5, atol=1e-3)
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(post.nll(x), -normal.log_prob(x).sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-3)
    assert post.mode() is post.mean
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(3)), mu + post.std * eps)


def test_scale_and_shift_live_in_encode_and_decode():
    cfg = CONFIGS["sd_like"]
    model = _model(cfg)
    x = _image()
    with torch.no_grad():
        raw = model.encode_posterior(x).mode()
        z = model.encode(x)
        torch.testing.assert_close(z, (raw - cfg.shift_factor) * cfg.scaling_factor)
        torch.testing.assert_close(model.decode(z), model.decoder(model.post_quant_conv(raw)), rtol=1e-5, atol=1e-5)
        z_sampled = model.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        again = model.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(z_sampled, again)
        assert not torch.allclose(z_sampled, z)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    cfg = CONFIGS[name]
    ref = diffusers.AutoencoderKL(**autoencoder_config_to_diffusers(cfg)).eval()
    _randomize(ref, seed=1)
    ref_sd = ref.state_dict()
    assert autoencoder_config_from_diffusers(dict(ref.config)) == cfg
    model = AutoencoderKL(cfg).eval()
    model.load_state_dict(vae_state_dict_from_diffusers(ref_sd), strict=True)
    x = _image()
    with torch.no_grad():
        ours, theirs = model.encode_posterior(x), ref.encode(x).latent_dist
        assert (ours.mean - theirs.mean).abs().max() <= 1e-4
        assert (ours.logvar - theirs.logvar).abs().max() <= 1e-4
        z = torch.randn(2, cfg.embed_dim, 8, 8, generator=torch.Generator().manual_seed(2))
        decoded = model.decode((z - cfg.shift_factor) * cfg.scaling_factor)
        assert (decoded - ref.decode(z).sample).abs().max() <= 1e-4
    # Round trip of names and shapes against diffusers' own layout.
    back = vae_state_dict_to_diffusers(model.state_dict())
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert all(torch.equal(back[k], ref_sd[k]) for k in ref_sd)


def test_legacy_diffusers_attention_names():
    cfg = CONFIGS["sd_like"]
    sd = vae_state_dict_to_diffusers(_model(cfg).state_dict())
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new, name in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        old[k] = v
    assert any(".query." in k for k in old)
    converted = vae_state_dict_from_diffusers(old)
    assert all(torch.equal(converted[k], v) for k, v in _model(cfg).state_dict().items())


def test_diffusers_without_quant_convs():
    diffusers = pytest.importorskip("diffusers")
    kwargs = autoencoder_config_to_diffusers(CONFIGS["sd_like"])
    ref = diffusers.AutoencoderKL(**kwargs, use_quant_conv=False, use_post_quant_conv=False).eval()
    _randomize(ref, seed=2)
    model = AutoencoderKL(autoencoder_config_from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(vae_state_dict_from_diffusers(ref.state_dict()), strict=True)
    x = _image()
    with torch.no_grad():
        assert (model.encode_posterior(x).mean - ref.encode(x).latent_dist.mean).abs().max() <= 1e-4
        recon, _ = model(x, sample_posterior=False)
        assert (recon - ref(x).sample).abs().max() <= 1e-4


def test_state_dict_key_round_trip_and_config_inference():
    for cfg in CONFIGS.values():
        sd = _model(cfg).state_dict()
        back = vae_state_dict_from_diffusers(vae_state_dict_to_diffusers(sd))
        assert set(back) == set(sd)
        assert all(torch.equal(back[k], sd[k]) for k in sd)
        inferred = autoencoder_config_from_state_dict(sd, scaling_factor=cfg.scaling_factor,
                                                      shift_factor=cfg.shift_factor, norm_num_groups=8)
        assert inferred == cfg
        prefixed = {f"first_stage_model.{k}": v for k, v in sd.items()}
        prefixed["model.diffusion_model.x.weight"] = torch.zeros(1)
        assert autoencoder_config_from_state_dict(prefixed, prefix="first_stage_model.", norm_num_groups=8,
                                                  scaling_factor=cfg.scaling_factor,
                                                  shift_factor=cfg.shift_factor) == cfg
    assert autoencoder_config_from_state_dict(sd, norm_num_groups=8).scaling_factor == 0.18215
    with pytest.raises(ValueError, match="missing"):
        autoencoder_config_from_state_dict({"decoder.up.0.block.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unrecognised"):
        vae_state_dict_from_diffusers({**vae_state_dict_to_diffusers(sd), "encoder.bogus.weight": torch.zeros(1)})


def test_config_conversion_edge_cases():
    base = autoencoder_config_to_diffusers(CONFIGS["sd_like"])
    assert base["shift_factor"] == 0.25 and base["up_block_types"] == ["UpDecoderBlock2D"] * 2
    assert autoencoder_config_from_diffusers({**base, "shift_factor": None}).shift_factor == 0.0
    attn = autoencoder_config_to_diffusers(AutoencoderKLConfig(**TINY, attn_resolutions=[1]))
    assert attn["down_block_types"] == ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
    assert attn["up_block_types"] == ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]
    for bad, message in (({"act_fn": "relu"}, "act_fn='relu' is not supported"),
                         ({"latents_mean": [0.0] * 4}, "per-channel latents_mean/latents_std are not supported"),
                         ({"up_block_types": ["AttnUpDecoderBlock2D"] * 2}, "attention levels differ")):
        with pytest.raises(ValueError, match=message):
            autoencoder_config_from_diffusers({**base, **bad})
    with pytest.raises(ValueError, match="embed_dim"):
        autoencoder_config_to_diffusers(AutoencoderKLConfig(**TINY, embed_dim=3))


def test_bad_inputs_raise_value_error():
    model = _model(CONFIGS["sd_like"])
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(_image(H=15, W=16))
    with pytest.raises(ValueError, match="shape"):
        model.encode(_image(C=1))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="attn_resolutions"):
        AutoencoderKL(AutoencoderKLConfig(**TINY, attn_resolutions=[4]))
