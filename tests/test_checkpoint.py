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


class Evil:
    """Unpickling this would create a file: a stand-in for arbitrary code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


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
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    assert not marker.exists()


def test_ckpt_with_tensors_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"a": torch.ones(3), "b": torch.zeros(2, 2)}, "global_step": 7}, path)
    tensors, meta = read_state_dict(path)
    assert set(tensors) == {"a", "b"} and meta == {}


def test_truncated_safetensors_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
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
    cfg = LatentDiffusionConfig()
    lin = torch.nn.Linear(4, 4)
    tied = {"a": lin.weight, "b": lin.weight}  # shared memory must still save
    path = save_model_file(tmp_path / "m.safetensors", cfg, {"unet": lin, "text_encoder": tied})
    assert is_model_file(path)
    cfg2, parts, meta = load_model_file(path)
    assert cfg2 == cfg and meta["format"] == "latentdiff"
    assert torch.equal(parts["unet"]["weight"], lin.weight) and torch.equal(parts["text_encoder"]["b"], lin.weight)
    with pytest.raises(FileExistsError):
        save_model_file(path, cfg, {"unet": lin})
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, plain)
    assert not is_model_file(plain)
    with pytest.raises(CheckpointError, match="not a latentdiff model"):
        load_model_file(plain)
