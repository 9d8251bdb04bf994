"""LoRA loading: kohya / AUTOMATIC1111 and diffusers / PEFT files on a tiny random SD 1 checkpoint, against
diffusers' ``StableDiffusionPipeline.load_lora_weights`` (U-Net outputs and text-encoder hidden states), unloading,
several LoRAs with their scales, files for another architecture, the PNG record and the txt2img flags."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import save_file

from latentdiff import load_pipeline
from latentdiff.cli import txt2img
from latentdiff.io.images import parse_parameters
from latentdiff.io.lora import lora_hash
from latentdiff.models.lora import LoRALayer, lora_layers
from latentdiff.pipelines.lora import split_lora_tags
from tests import sd_helpers as H

RANK = 4
UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    unet, vae, text = H.diffusers_unet(sd2=False), H.diffusers_vae(), H.clip_text_model()
    folder = tmp_path_factory.mktemp("lora")
    file = H.save_single_file(folder / "sd1.safetensors", H.compvis_state(unet, vae, text, sd2=False))
    return unet, vae, text, file


@pytest.fixture(scope="module")
def model_file(sd, tmp_path_factory):
    """The tiny SD 1 model as a latentdiff model file (its config holds the head layout: no overrides needed)."""
    path = tmp_path_factory.mktemp("lora_model") / "sd1_model.safetensors"
    return load_pipeline(sd[3], overrides=H.SD1_OVERRIDES).save(path)


def lora_modules(unet, text) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, reference module name, module) of every layer the test LoRA adapts: attention projections,
    feed-forward, proj_in/proj_out (1x1 convolutions in SD 1), resnet 3x3 convolutions and 1x1 conv shortcuts,
    and the text encoder's q/k/v/out/fc1/fc2."""
    out = []
    for name, m in unet.named_modules():
        if (name.endswith(UNET_LAYERS) or name.endswith(("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut"))) \
                and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out.append(("unet", name, m))
    for name, m in text.named_modules():
        if name.endswith(TEXT_LAYERS) and isinstance(m, torch.nn.Linear):  # transformers >= 5 drops text_model.
            out.append(("text_encoder", "text_model." + name.removeprefix("text_model."), m))
    return out


def random_lora(unet, text, seed: int, layout: str = "kohya", std: float = 0.15) -> dict[str, torch.Tensor]:
    """Random LoRA tensors for every layer of :func:`lora_modules` in a kohya or PEFT (diffusers) layout."""
    g = torch.Generator().manual_seed(seed)
    alpha = float(torch.randint(1, 9, (), generator=g))  # one alpha per file, as kohya writes (diffusers mis-reads
    tensors = {}  # per-layer alphas of attention layers: its alpha_pattern keys keep 'processor.to_q_lora...')
    for component, name, m in lora_modules(unet, text):
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g) * std
            up = torch.randn(m.out_channels, RANK, 1, 1, generator=g) * std
        else:
            down = torch.randn(RANK, m.in_features, generator=g) * std
            up = torch.randn(m.out_features, RANK, generator=g) * std
        if layout == "kohya":
            stem = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        elif layout == "peft":
            tensors[f"{component}.{name}.lora_A.weight"], tensors[f"{component}.{name}.lora_B.weight"] = down, up
        else:  # diffusers' older layout: attention processors, text lora_linear_layer, .lora.down/.lora.up
            proc = re.fullmatch(r"(.+\.attn\d)\.(to_q|to_k|to_v|to_out)(?:\.0)?", name)
            if proc:
                stem = f"{component}.{proc.group(1)}.processor.{proc.group(2)}_lora"
            elif component == "text_encoder":
                stem = f"{component}.{name}.lora_linear_layer"
            else:
                stem = f"{component}.{name}.lora"
            tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up
    return tensors


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, H.LATENT, H.LATENT, generator=g)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, H.TEXT_WIDTH, generator=g)
    return x, t, context


@torch.no_grad()
def ours_outputs(pipe, prompts=("a photo of a cat", "a red ship")):
    x, t, context = inputs()
    return pipe.unet(x, t, context), pipe.text_encoder(pipe.text_encoder.tokenize(list(prompts)))


@torch.no_grad()
def diffusers_outputs(sd, files_and_scales, ids):
    from diffusers import StableDiffusionPipeline

    unet, vae, text, _ = sd
    ref = StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(text), tokenizer=H.clip_tokenizer(),
                                  unet=copy.deepcopy(unet), scheduler=H.ddim_scheduler(), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    names = []
    for i, (file, _) in enumerate(files_and_scales):
        ref.load_lora_weights(str(file), adapter_name=f"a{i}")
        names.append(f"a{i}")
    ref.set_adapters(names, adapter_weights=[s for _, s in files_and_scales])
    x, t, context = inputs()
    return ref.unet(x, t, encoder_hidden_states=context).sample, ref.text_encoder(ids).last_hidden_state


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("layout", ["kohya", "peft", "diffusers-old"])
def test_matches_diffusers_load_lora_weights(sd, tmp_path, layout):
    unet, vae, text, file = sd
    lora_file = tmp_path / f"style_{layout}.safetensors"
    save_file(random_lora(unet, text, seed=1, layout=layout), str(lora_file))
    pipe = load_pipeline(file, overrides=H.SD1_OVERRIDES)
    base_unet, base_text = ours_outputs(pipe)
    pipe.load_lora(lora_file, scale=0.7)
    assert len(lora_layers(pipe.unet)) == sum(c == "unet" for c, _, _ in lora_modules(unet, text))
    ours_unet, ours_text = ours_outputs(pipe)
    ids = pipe.text_encoder.tokenize(["a photo of a cat", "a red ship"])
    ref_unet, ref_text = diffusers_outputs(sd, [(lora_file, 0.7)], ids)
    print(f"{layout}: U-Net max |ours - diffusers| = {max_diff(ours_unet, ref_unet):.2e} (LoRA changed it by "
          f"{max_diff(ours_unet, base_unet):.2e}); text {max_diff(ours_text, ref_text):.2e} "
          f"(changed by {max_diff(ours_text, base_text):.2e})")
    assert max_diff(ours_unet, base_unet) > 1e-2 and max_diff(ours_text, base_text) > 1e-2  # the LoRA matters
    assert max_diff(ours_unet, ref_unet) <= 1e-4
    assert max_diff(ours_text, ref_text) <= 1e-4


def test_two_loras_add_up_and_unload_restores_exactly(sd, tmp_path):
    unet, vae, text, file = sd
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(random_lora(unet, text, seed=2), str(a))
    save_file(random_lora(unet, text, seed=3, layout="peft"), str(b))
    pipe = load_pipeline(file, overrides=H.SD1_OVERRIDES)
    base = ours_outputs(pipe)
    pipe.load_lora(a, scale=0.5)
    pipe.load_lora(b, scale=-0.8, name="other")
    assert [(n, s) for n, s, _ in pipe.loras] == [("a", 0.5), ("other", -0.8)]
    assert pipe.loras[0][2] == lora_hash(a) and len(lora_hash(a)) == 12
    both = ours_outputs(pipe)
    ids = pipe.text_encoder.tokenize(["a photo of a cat", "a red ship"])
    ref = diffusers_outputs(sd, [(a, 0.5), (b, -0.8)], ids)
    assert max_diff(both[0], ref[0]) <= 1e-4 and max_diff(both[1], ref[1]) <= 1e-4
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora(a)
    pipe.unload_lora("a")
    assert [n for n, _, _ in pipe.loras] == ["other"]
    pipe.unload_lora()
    assert pipe.loras == [] and not lora_layers(pipe.unet) and not lora_layers(pipe.text_encoder)
    after = ours_outputs(pipe)
    assert torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])  # bit for bit
    with pytest.raises(ValueError, match="no LoRA named"):
        pipe.unload_lora("a")


def test_lora_for_another_architecture_names_unmatched_keys(sd, tmp_path):
    unet, vae, text, file = sd
    pipe = load_pipeline(file, overrides=H.SD1_OVERRIDES)
    tensors = random_lora(unet, text, seed=4)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(RANK, 8)  # no such block
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, RANK)
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.hada_w1_a"] = torch.zeros(2, 2)  # LoHa, other layout
    bad = tmp_path / "sdxl.safetensors"
    save_file(tensors, str(bad))
    before = ours_outputs(pipe)
    with pytest.raises(ValueError) as err:
        pipe.load_lora(bad)
    msg = str(err.value)
    assert "3 key(s) fit no layer" in msg and "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight" in msg
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.hada_w1_a" in msg
    # right names, wrong widths (an SD 2 LoRA on SD 1): the shapes are named, nothing is applied
    wide = {k: torch.cat([v, v], dim=1) if k.endswith("attn2_to_k.lora_down.weight") else v
            for k, v in random_lora(unet, text, seed=5).items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="attn2_to_k.*do not fit"):
        pipe.load_lora(tmp_path / "wide.safetensors")
    assert pipe.loras == [] and not lora_layers(pipe.unet)
    assert torch.equal(ours_outputs(pipe)[0], before[0])
    with pytest.raises(ValueError, match="does not exist"):
        pipe.load_lora(tmp_path / "missing.safetensors")


def test_parameters_record_lora_hashes_and_parse_back(sd, tmp_path):
    unet, vae, text, file = sd
    pipe = load_pipeline(file, overrides=H.SD1_OVERRIDES)
    lora = tmp_path / "ink, style.safetensors"  # a ", " in the name: the field is quoted
    save_file(random_lora(unet, text, seed=6), str(lora))
    pipe.load_lora(lora, scale=0.6)
    pipe.load_lora(lora, scale=0.2, name="second")
    (image,) = pipe("a cat", steps=2, seed=0, height=H.IMAGE_SIZE, width=H.IMAGE_SIZE)
    text_ = image.info["parameters"]
    h = lora_hash(lora)
    assert f'Lora hashes: "ink, style: {h}, second: {h}"' in text_
    fields = parse_parameters(text_)
    assert fields["Lora hashes"] == f"ink, style: {h}, second: {h}" and fields["Seed"] == "0"
    with pytest.raises(ValueError, match="unload_lora"):
        pipe.save(tmp_path / "model.safetensors")


def test_split_lora_tags():
    assert split_lora_tags("a cat <lora:ink:0.6>, <lora:detail>") == ("a cat ,", [("ink", 0.6), ("detail", 1.0)])
    assert split_lora_tags("plain") == ("plain", [])
    with pytest.raises(ValueError, match="must be a number"):
        split_lora_tags("<lora:ink:strong>")


def test_layers_expose_merged_weight():
    layer = LoRALayer(torch.nn.Conv2d(3, 5, 3, padding=1))
    from latentdiff.models.lora import LoRA

    layer.adapters["a"] = LoRA(torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1), alpha=1.0, scale=0.5)
    x = torch.randn(1, 3, 6, 6)
    merged = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    assert torch.allclose(layer(x), merged, atol=1e-5)


# ---------------------------------------------------------------------------------------------- txt2img


def run_cli(argv, capsys):
    code = txt2img.main(argv)
    return code, capsys.readouterr()


def test_txt2img_lora_flag_and_prompt_tag(sd, model_file, tmp_path, capsys):
    unet, vae, text, _ = sd
    file = model_file
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(random_lora(unet, text, seed=7), str(loras / "ink.safetensors"))
    save_file(random_lora(unet, text, seed=8), str(tmp_path / "detail.safetensors"))
    common = ["--ckpt", str(file), "--steps", "2", "--H", "16", "--W", "16", "--seed", "1", "--device", "cpu",
              "--quiet", "--no-grid"]
    out = tmp_path / "out"
    code, _ = run_cli(["a cat <lora:ink:0.5>", "--lora-dir", str(loras), "--lora",
                       f"{tmp_path / 'detail.safetensors'}:0.3", "--outdir", str(out), *common], capsys)
    assert code == 0
    from PIL import Image

    (png,) = sorted(out.glob("*.png"))
    fields = parse_parameters(Image.open(png).info["parameters"])
    assert fields["prompt"] == "a cat <lora:ink:0.5>"  # kept as AUTOMATIC1111 records it
    ink, detail = lora_hash(loras / "ink.safetensors"), lora_hash(tmp_path / "detail.safetensors")
    assert fields["Lora hashes"] == f"detail: {detail}, ink: {ink}"
    # the same image from Python: the tag is stripped before encoding
    pipe = load_pipeline(file)
    pipe.load_lora(tmp_path / "detail.safetensors", scale=0.3)
    pipe.load_lora(loras / "ink.safetensors", scale=0.5)
    images, _ = pipe.generate("a cat", steps=2, seed=1, height=H.IMAGE_SIZE, width=H.IMAGE_SIZE)
    from latentdiff.io.images import to_pil

    assert to_pil(images)[0].tobytes() == Image.open(png).convert("RGB").tobytes()
    # --from-png: the tags come back from the prompt, --lora LoRAs must be given again (a warning says so)
    again = ["--from-png", str(png), "--lora-dir", str(loras), "--device", "cpu", "--quiet", "--ckpt", str(file)]
    code, _ = run_cli([*again, "--lora", f"{tmp_path / 'detail.safetensors'}:0.3", "--outdir", str(tmp_path / "o2")],
                      capsys)
    (png2,) = sorted((tmp_path / "o2").glob("*.png"))
    assert code == 0 and Image.open(png2).tobytes() == Image.open(png).tobytes()
    code, captured = run_cli([*again, "--outdir", str(tmp_path / "o3")], capsys)
    assert code == 0 and "made with LoRAs ['detail', 'ink']" in captured.err


@pytest.mark.parametrize("args, message", [
    (["a cat <lora:ink:0.5>"], "--lora-dir"),
    (["a cat <lora:nothere>", "--lora-dir", "{loras}"], "nothere.safetensors"),
    (["a cat", "--lora", "{tmp}/sdxl.safetensors"], "fit no layer"),
    (["a cat", "--lora", "{tmp}/missing.safetensors:0.5"], "does not exist"),
])
def test_txt2img_lora_errors_exit_2(model_file, tmp_path, capsys, args, message):
    file = model_file
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"lora_unet_down_blocks_9_proj.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_down_blocks_9_proj.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "sdxl.safetensors"))
    args = [a.format(loras=loras, tmp=tmp_path) for a in args]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        txt2img.main([*args, "--ckpt", str(file), "--steps", "1", "--H", "16", "--W", "16", "--device", "cpu",
                      "--quiet", "--outdir", str(out)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
