"""VQ-Diffusion transformer: shapes, conditioning, and equality with diffusers' discrete Transformer2DModel."""

import pytest
import torch

from latentdiff.config import VQTransformerConfig
from latentdiff.diffusion.discrete import DiscreteSchedule, vq_diffusion_loss
from latentdiff.diffusion.discrete_sampling import learned_classifier_free_guidance, sample
from latentdiff.io.convert_vq import (
    transformer_config_from_diffusers,
    transformer_config_to_diffusers,
    transformer_state_dict_from_diffusers,
    transformer_state_dict_to_diffusers,
)
from latentdiff.models.transformer import VQDiffusionTransformer
from tests.tiny import random_weights

K, T, S = 6, 10, 4  # codes, timesteps, latent side


def tiny_config(**kw):
    return VQTransformerConfig(**({"num_codes": K, "latent_size": S, "dim": 16, "heads": 2, "depth": 2,
                                   "context_dim": 12, "context_length": 5, "num_timesteps": T} | kw))


def inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randint(0, K + 1, (B, S * S), generator=g)
    return x_t, torch.randint(0, T, (B,), generator=g), torch.randn(B, 5, 12, generator=g)


def test_output_is_log_probs_over_codes():
    model = VQDiffusionTransformer(tiny_config()).eval()
    x_t, t, context = inputs()
    out = model(x_t, t, context)
    assert out.shape == (2, K, S * S) and out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(2, S * S))
    with pytest.raises(ValueError, match="latent_size"):
        model(x_t[:, :5], t, context)


def test_per_sample_timesteps_and_checkpointing(monkeypatch):
    import latentdiff.models.transformer as transformer_module

    model = random_weights(VQDiffusionTransformer(tiny_config()), std=0.3).train()
    x_t, t, context = inputs()
    out = model(x_t, t, context)
    for b in range(2):
        torch.testing.assert_close(out[b:b + 1], model(x_t[b:b + 1], int(t[b]), context[b:b + 1]))
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformer_module, "checkpoint", counting_checkpoint)
    checkpointed = random_weights(VQDiffusionTransformer(tiny_config(gradient_checkpointing=True)), std=0.3).train()
    torch.testing.assert_close(checkpointed(x_t, t, context), out)
    assert len(calls) == 2  # one per block (depth 2)
    for m in (model, checkpointed):  # and the same gradients through the recomputed blocks
        m.zero_grad()
        m(x_t, t, context).logsumexp(1).sum().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_drop_context_uses_learned_null():
    model = VQDiffusionTransformer(tiny_config())
    assert model.null_context.shape == (5, 12)
    _, _, context = inputs(B=4)
    assert torch.equal(model.drop_context(context, 0.0), context)
    dropped = model.drop_context(context, 1.0)
    assert torch.equal(dropped, model.null_context[None].expand(4, -1, -1))
    dropped.sum().backward()
    assert model.null_context.grad is not None
    with pytest.raises(ValueError, match="learned_null_context"):
        VQDiffusionTransformer(tiny_config(learned_null_context=False)).drop_context(context, 0.5)


def diffusers_model(activation_fn):
    from diffusers import Transformer2DModel

    return Transformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=12,
                              attention_bias=True, sample_size=S, num_vector_embeds=K + 1,
                              activation_fn=activation_fn, num_embeds_ada_norm=T, norm_type="ada_norm")


@pytest.mark.parametrize("activation_fn", ["geglu-approximate", "gelu"])
def test_matches_diffusers_transformer(activation_fn):
    ref = random_weights(diffusers_model(activation_fn), std=0.3).eval()
    null = torch.randn(5, 12)
    cfg = transformer_config_from_diffusers(dict(ref.config),
                                            {"learnable": True, "hidden_size": 12, "length": 5})
    assert cfg == tiny_config(ff_activation={"geglu-approximate": "gelu_sigmoid", "gelu": "gelu"}[activation_fn])
    ours = VQDiffusionTransformer(cfg).eval()
    ours.load_state_dict(transformer_state_dict_from_diffusers(ref.state_dict(), null), strict=True)
    assert torch.equal(ours.null_context, null)
    x_t, _, context = inputs(B=3, seed=1)
    with torch.no_grad():
        for t in (0, 4, T - 1):  # diffusers' AdaLayerNorm takes one timestep for the whole batch
            want = ref(x_t, encoder_hidden_states=context, timestep=torch.tensor(t)).sample
            torch.testing.assert_close(ours(x_t, t, context), want, atol=1e-4, rtol=0)


def test_conversion_round_trips():
    ref = diffusers_model("geglu-approximate")
    cfg = transformer_config_from_diffusers(dict(ref.config))
    assert not cfg.learned_null_context and cfg.context_length == 77
    back = transformer_config_to_diffusers(cfg)
    assert all(ref.config[k] == v for k, v in back.items()), back
    sd = VQDiffusionTransformer(tiny_config()).state_dict()
    theirs, null = transformer_state_dict_to_diffusers(sd)
    assert set(theirs) == set(ref.state_dict()) and null is sd["null_context"]
    assert transformer_state_dict_from_diffusers(theirs, null).keys() == sd.keys()
    with pytest.raises(ValueError, match="unrecognised"):
        transformer_state_dict_from_diffusers(theirs | {"transformer_blocks.0.extra.weight": null})


def test_trains_and_samples_with_the_discrete_diffusion():
    model = VQDiffusionTransformer(tiny_config())
    schedule = DiscreteSchedule(K, T)
    g = torch.Generator().manual_seed(0)
    x0, _, context = inputs(B=2)
    x0 = x0.clamp(max=K - 1)
    out = vq_diffusion_loss(schedule, model, x0, model_kwargs={"context": model.drop_context(context, 0.5, g)},
                            generator=g)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.to_logits.weight.grad is not None
    guided = learned_classifier_free_guidance(model.eval(), 3.0, model.null_context.detach())
    with torch.no_grad():
        codes = sample(guided, schedule, (2, S * S), steps=T // 2, truncation_rate=0.9, generator=g,
                       model_kwargs={"context": context})
    assert codes.shape == (2, S * S) and torch.all((codes >= 0) & (codes < K))
