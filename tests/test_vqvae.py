"""Vector quantizer (straight-through, losses, EMA, dead-code restarts) and the VQ autoencoder."""

import pytest
import torch
import torch.nn.functional as F

from latentdiff.config import VQModelConfig
from latentdiff.io.convert_vq import vq_model_config_from_diffusers, vq_model_state_dict_from_diffusers
from latentdiff.models.vqvae import VectorQuantizer, VQAutoencoder


def codebook(q, vectors):
    with torch.no_grad():
        q.embedding.weight.copy_(torch.as_tensor(vectors, dtype=torch.float32))
    if q.ema:
        q.embed_sum.copy_(q.embedding.weight)
    return q


def test_nearest_code_and_straight_through_gradient():
    q = codebook(VectorQuantizer(3, 2), [[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]])
    z = torch.tensor([[0.9, 1.2], [0.1, -0.1], [-0.8, 1.7], [0.6, 0.6]]).T.reshape(1, 2, 2, 2).requires_grad_()
    out = q(z)
    assert out.codes.tolist() == [[[1, 0], [2, 1]]]
    torch.testing.assert_close(out.z_q.detach(), q.lookup(out.codes))
    out.z_q.sum().backward()  # d z_q / d z = identity: the decoder's gradient reaches the encoder
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_codebook_and_commitment_loss_values():
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = VectorQuantizer(8, 4, beta=0.25)
    out = q(z)
    mse = F.mse_loss(z.detach(), out.z_q.detach())
    torch.testing.assert_close(out.loss, 1.25 * mse)  # ||sg[z] - e||² + β ||z - sg[e]||², equal values
    out.loss.backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - out.z_q).detach() / z.numel())  # only β·commitment
    assert q.embedding.weight.grad.abs().sum() > 0
    ema = VectorQuantizer(8, 4, beta=0.25, ema=True).eval()
    out = ema(z)
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(z.detach(), out.z_q.detach()))


def test_stats():
    q = codebook(VectorQuantizer(4, 1), [[0.0], [1.0], [2.0], [3.0]])
    out = q(torch.tensor([0.0, 0.1, 1.0, 1.1]).view(1, 1, 2, 2))  # two codes used, equally often
    torch.testing.assert_close(out.stats["usage"], torch.tensor(0.5))
    torch.testing.assert_close(out.stats["perplexity"], torch.tensor(2.0))


def test_ema_moves_codes_toward_assigned_means():
    q = codebook(VectorQuantizer(2, 2, ema=True, decay=0.9), [[0.0, 0.0], [5.0, 5.0]]).train()
    z = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T.reshape(1, 2, 2, 2)  # all nearest code 0
    mean = torch.tensor([0.75, 0.75])
    before = (q.embedding.weight[0] - mean).norm()
    for _ in range(20):
        q(z)
    after = (q.embedding.weight[0] - mean).norm()
    assert after < 0.2 * before
    torch.testing.assert_close(q.embedding.weight[1], torch.tensor([5.0, 5.0]), atol=0.1, rtol=0)  # unused: stays
    assert not q.embedding.weight.requires_grad
    q.eval()
    frozen = q.embedding.weight.clone()
    q(z)
    assert torch.equal(frozen, q.embedding.weight)  # no updates outside training


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_restarted_from_encoder_outputs(ema):
    q = codebook(VectorQuantizer(3, 2, ema=ema, restart_dead_codes=True, dead_code_threshold=0.5, decay=0.5),
                 [[0.0, 0.0], [100.0, 100.0], [1.0, 1.0]]).train()
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.9, 1.0], [1.0, 0.9]]).T.reshape(1, 2, 2, 2)
    q(z)  # code 1 is never chosen: its count decays 1 -> 0.5 (EMA: the Laplace smoothing moves it a hair)
    torch.testing.assert_close(q.embedding.weight[1], torch.tensor([100.0, 100.0]), atol=0.01, rtol=0)
    q(z)  # 0.25 < 0.5: dead, re-seeded with one of the batch vectors
    restarted = q.embedding.weight[1]
    assert any(torch.equal(restarted, v) for v in z.flatten(2)[0].T)
    assert q.cluster_size[1] == 0.5


def tiny_vq_config(**kw):
    return VQModelConfig(**({"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [2],
                             "z_channels": 4, "embed_dim": 3, "num_codes": 16, "norm_num_groups": 4} | kw))


def test_vq_autoencoder_shapes():
    model = VQAutoencoder(tiny_vq_config())
    x = torch.randn(2, 3, 16, 16)
    codes = model.encode_to_codes(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long and codes.max() < 16
    assert model.decode_codes(codes).shape == (2, 3, 16, 16)
    recon, loss, stats = model(x)
    assert recon.shape == x.shape and loss.dim() == 0 and set(stats) == {"usage", "perplexity"}
    (F.mse_loss(recon, x) + loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    torch.testing.assert_close(model.decode_codes(codes), model.decode(model.quantize(model.encode(x)).z_q))


def test_matches_diffusers_vq_model():
    from diffusers import VQModel

    ref = VQModel(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                  up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], layers_per_block=1,
                  latent_channels=4, vq_embed_dim=3, num_vq_embeddings=16, norm_num_groups=4).eval()
    cfg = vq_model_config_from_diffusers(dict(ref.config))
    assert cfg == tiny_vq_config()
    ours = VQAutoencoder(cfg).eval()
    ours.load_state_dict(vq_model_state_dict_from_diffusers(ref.state_dict()), strict=True)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = ref.encode(x).latents
        torch.testing.assert_close(ours.encode(x), h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(ours.quantize(h).z_q), ref.decode(h).sample, atol=1e-5, rtol=1e-5)
