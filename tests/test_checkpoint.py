import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.config import LatentDiffusionConfig
from latentdiff.io.checkpoint import (
    CheckpointError,
    check_finite,
    is_model_file,
    load_into,
    load_model_file,
    read_state_dict,
    save_model_file,
)
from tests.tiny import Evil, tiny_ldm_config


def test_malicious_ckpt_is_refused_and_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Evil(str(marker))}, ckpt)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refuses for safety"):
        read_state_dict(ckpt)
    assert not marker.exists()


def test_plain_pickle_payload_refused(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(Evil(str(marker)), f)
    with pytest.raises(CheckpointError, match="refuses for safety"):
        read_state_dict(path)
    assert not marker.exists()


def test_ckpt_with_tensors_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    state = {"a": torch.randn(3), "b": torch.arange(4.0).view(2, 2), "note": "not a tensor"}
    torch.save({"state_dict": state, "global_step": 7}, path)
    tensors, meta = read_state_dict(path)
    assert set(tensors) == {"a", "b"} and meta == {}  # the tensors of the nested state_dict, nothing else
    assert torch.equal(tensors["a"], state["a"]) and torch.equal(tensors["b"], state["b"])
    torch.save({"a": state["a"]}, tmp_path / "flat.pt")  # a bare dict of tensors loads too
    assert torch.equal(read_state_dict(tmp_path / "flat.pt")[0]["a"], state["a"])


def test_truncated_safetensors_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


def test_random_bytes_are_a_corrupt_checkpoint_whatever_the_unpickler_trips_on(tmp_path):
    """Random bytes make torch's weights-only unpickler fail with IndexError, KeyError, UnicodeDecodeError, ...
    (about 1 file in 12 of 4 KiB): each is reported as an unreadable checkpoint, never as a crash."""
    import numpy as np

    path = tmp_path / "random.pth"
    for seed in range(120):
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(CheckpointError, match="not a readable checkpoint|refuses"):
            read_state_dict(path)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        read_state_dict(tmp_path / "x.onnx")


def test_non_finite_refused():
    with pytest.raises(CheckpointError, match="non-finite"):
        check_finite({"ok": torch.ones(2), "bad": torch.tensor([1.0, float("nan")])}, "f")


def test_load_into_reports_names():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError) as e:
        load_into(m, {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}, "lin")
    msg = str(e.value)
    assert "missing key(s), e.g. ['bias']" in msg and "'extra'" in msg and "weight: file (2, 4) vs model (2, 3)" in msg


def test_model_file_round_trip_and_no_overwrite(tmp_path):
    cfg = tiny_ldm_config()  # not the defaults: a config lost on the way would read back as defaults
    lin = torch.nn.Linear(4, 4)
    tied = {"a": lin.weight, "b": lin.weight}  # shared memory must still save
    path = save_model_file(tmp_path / "m.safetensors", cfg, {"unet": lin, "text_encoder": tied})
    assert is_model_file(path)
    cfg2, parts, meta = load_model_file(path)
    assert cfg2 == cfg and meta["format"] == "latentdiff"
    assert torch.equal(parts["unet"]["weight"], lin.weight) and torch.equal(parts["text_encoder"]["b"], lin.weight)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_model_file(path, LatentDiffusionConfig(), {"unet": torch.nn.Linear(2, 2)})
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, plain)
    assert not is_model_file(plain)
    with pytest.raises(CheckpointError, match="not a latentdiff model"):
        load_model_file(plain)


def test_compact_rows_keep_the_named_rows_and_share_one_for_the_rest(tmp_path):
    from latentdiff.io.checkpoint import compact_rows, expand_rows

    full = torch.randn(50, 3)
    rows, ids = compact_rows(full, torch.tensor([7, 3, 7, 49]))
    assert ids.tolist() == [3, 7, 49] and rows.shape == (4, 3)
    dropped = torch.ones(50, dtype=torch.bool)
    dropped[ids] = False
    back = expand_rows(rows, ids, 50)
    assert torch.equal(back[ids], full[ids])
    assert torch.allclose(back[dropped], full[dropped].mean(0).expand(47, 3))
    with pytest.raises(ValueError, match="must lie in"):
        compact_rows(full, torch.tensor([50]))
    with pytest.raises(ValueError, match="do not fit"):
        expand_rows(rows[:2], ids, 50)


def test_model_file_with_compact_rows_loads_full_tensors(tmp_path):
    cfg = LatentDiffusionConfig()
    emb = torch.randn(100, 4)
    parts = {"text_encoder": {"token_embedding.weight": emb, "proj": torch.randn(4, 4)}}
    path = save_model_file(tmp_path / "m.safetensors", cfg, parts, keep_rows={
        "text_encoder.token_embedding.weight": torch.tensor([0, 5, 99])})
    _, loaded, meta = load_model_file(path)
    got = loaded["text_encoder"]["token_embedding.weight"]
    assert got.shape == (100, 4) and torch.equal(got[[0, 5, 99]], emb[[0, 5, 99]])
    assert torch.equal(loaded["text_encoder"]["proj"], parts["text_encoder"]["proj"])
    assert set(loaded["text_encoder"]) == {"token_embedding.weight", "proj"}
    # re-saving what was loaded (metadata passed on) stores full tensors, not stale compact_rows metadata
    again = save_model_file(tmp_path / "again.safetensors", cfg, loaded, extra_metadata=meta)
    assert torch.equal(load_model_file(again)[1]["text_encoder"]["token_embedding.weight"], got)
    with pytest.raises(ValueError, match="not a tensor of this model"):
        save_model_file(tmp_path / "x.safetensors", cfg, parts, keep_rows={"text_encoder.nope": torch.tensor([0])})


def test_inconsistent_compact_rows_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file as save_raw

    from latentdiff.config import config_to_json

    meta = {"format": "latentdiff", "format_version": "1", "config": config_to_json(LatentDiffusionConfig()),
            "compact_rows": '{"text_encoder.token_embedding.weight": 10}'}
    path = tmp_path / "bad.safetensors"
    save_raw({"text_encoder.token_embedding.weight.kept_rows": torch.zeros(3, 2),
              "text_encoder.token_embedding.weight.kept_ids": torch.tensor([1, 20, 30])}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="compact_rows tensors are inconsistent"):
        load_model_file(path)
