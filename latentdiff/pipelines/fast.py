"""Speed and memory switches of the latent-diffusion pipeline: tiled VAE decoding and encoding for large images,
and a compiled fast path.

    pipe.enable_tiling(tile=512, overlap=128)   # always decode (and img2img-encode) in 512-pixel tiles
    pipe.disable_tiling()                       # never
    pipe.enable_tiling(auto=True)               # the default: tiles above AUTO_TILE_ABOVE pixels a side
    pipe.compile()                              # torch.compile the U-Net and the VAE decoder (dynamic=False)
    pipe.compile(mode="max-autotune", channels_last=True)
    pipe.compile_report()                       # {"unet": "compiled, first call 41.2 s", "decoder": ...}

The tiling itself is :mod:`latentdiff.models.tiling`. Compiling wraps the modules the pipeline holds: each
module's ``forward`` becomes ``torch.compile(forward, mode=mode, dynamic=False)`` (its parameters and state dict
are untouched, so ``save()`` writes the same file); compilation happens on the first call of each input shape (a
new batch size or image size compiles again) and inductor caches its kernels on disk between runs. Where compiling
fails (no C/C++ toolchain, a backend the device lacks), the module runs eager from then on and one line on stderr
says why, never a traceback; an error that the eager module raises too is the caller's and propagates. Eager stays
the reference the fast path is tested against.
"""

from __future__ import annotations

import sys
import time

import torch

from latentdiff.models.tiling import DEFAULT_TILE, VAETiling, check_tiling

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledForward:
    """A module's ``forward`` replaced by its compiled version, falling back to eager for good on the first failure
    of the compiler. ``first_call_s`` is the time of the first compiled call (compilation included); ``error`` the
    reason of a fallback (None while compiled). ``verbose``: say on stderr how long the first call took."""

    def __init__(self, name: str, module: torch.nn.Module, mode: str, verbose: bool = False):
        self.name = name
        self.verbose = verbose
        self.eager = module.forward  # the class's bound forward
        self.first_call_s: float | None = None
        self.error: str | None = None
        try:
            self.compiled = torch.compile(self.eager, mode=mode, dynamic=False)
        except Exception as e:  # noqa: BLE001 - any failure of the compiler means eager
            self.compiled = None
            self._fall_back(e)

    def _fall_back(self, e: Exception) -> None:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        self.error = f"{type(e).__name__}: {first}"
        print(f"warning: torch.compile of {self.name} failed ({self.error}); running it eager", file=sys.stderr)

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        start = time.perf_counter() if self.first_call_s is None else None
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            out = self.eager(*args, **kwargs)  # an error of the inputs themselves raises here, compiled kept
            self.compiled = None
            self._fall_back(e)
            return out
        if start is not None:
            self.first_call_s = time.perf_counter() - start
            if self.verbose:
                print(f"compiled {self.name}: first call {self.first_call_s:.1f} s (compilation included)",
                      file=sys.stderr)
        return out

    def report(self) -> str:
        if self.error is not None:
            return f"eager ({self.error})"
        if self.first_call_s is None:
            return "compiled, not called yet"
        return f"compiled, first call {self.first_call_s:.1f} s"


class FastPathMixin:
    """Tiling and compile switches for a pipeline holding ``unet`` and ``autoencoder`` (an AutoencoderKL)."""

    tiling: VAETiling = VAETiling()  # frozen, so one shared default is safe; enable_tiling sets the instance's own

    def enable_tiling(self, tile: int = DEFAULT_TILE, overlap: int | None = None, auto: bool = False) -> None:
        """Decode (and encode init images) in tiles of ``tile`` pixels overlapping by ``overlap`` (default a
        quarter of the tile): always, or with ``auto`` only for images with a side above AUTO_TILE_ABOVE pixels.
        ValueError for a tile that does not fit the autoencoder's downsampling (:func:`check_tiling`)."""
        tile, overlap = check_tiling(tile, overlap, self.autoencoder.downsample_factor)
        self.tiling = VAETiling("auto" if auto else "on", tile, overlap)

    def disable_tiling(self) -> None:
        """Decode and encode whole images, whatever their size."""
        self.tiling = VAETiling("off")

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``autoencoder.decode`` under the tiling setting: latents (B, C, h, w) -> images (B, 3, H, W)."""
        return self.tiling.decode(self.autoencoder, z)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """``autoencoder.encode`` under the tiling setting: images (B, 3, H, W) -> latents (B, C, h, w)."""
        return self.tiling.encode(self.autoencoder, x)

    def compiled_modules(self) -> dict[str, torch.nn.Module]:
        """The modules :meth:`compile` wraps: the U-Net and the autoencoder's decoder."""
        return {"unet": self.unet, "decoder": self.autoencoder.decoder}

    def compile(self, mode: str = "default", channels_last: bool = False, verbose: bool = False) -> None:
        """torch.compile the U-Net and the VAE decoder (``mode`` one of COMPILE_MODES, static shapes), optionally in
        channels_last memory format. Calling it again recompiles with the new settings; :meth:`uncompile` undoes
        it. Falls back to eager per module, with one line on stderr, where the compiler fails. ``verbose``: print
        each module's first-call (compile) time to stderr."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} must be one of {COMPILE_MODES}")
        self.uncompile()
        for name, module in self.compiled_modules().items():
            if channels_last:
                module.to(memory_format=torch.channels_last)
            module.forward = CompiledForward(name, module, mode, verbose)

    def uncompile(self) -> None:
        """Eager modules again, in the contiguous memory format."""
        for module in self.compiled_modules().values():
            if isinstance(module.__dict__.get("forward"), CompiledForward):
                del module.forward
                module.to(memory_format=torch.contiguous_format)

    def compile_report(self) -> dict[str, str]:
        """Per compiled module: "compiled, first call X s", "compiled, not called yet" or "eager (reason)"."""
        return {name: module.forward.report() for name, module in self.compiled_modules().items()
                if isinstance(module.__dict__.get("forward"), CompiledForward)}
