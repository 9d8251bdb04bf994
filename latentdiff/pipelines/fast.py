"""Speed and memory switches of the latent-diffusion pipeline: tiled VAE decoding and encoding for large images,
and a compiled fast path.

    pipe.enable_tiling(tile=512, overlap=128)   # always decode (and img2img-encode) in 512-pixel tiles
    pipe.disable_tiling()                       # never
    pipe.enable_tiling(auto=True)               # the default: tiles above AUTO_TILE_ABOVE pixels a side
    pipe.compile()                              # torch.compile the U-Net and the VAE decoder (dynamic=False)
    pipe.compile(mode="max-autotune", channels_last=True)
    pipe.compile_report()                       # {"unet": "compiled, first call 41.2 s", "decoder": ...}
    pipe.fuse_qkv()                             # one matrix product for q, k, v of each self-attention
    pipe.enable_deepcache(interval=3, branch=1) # DeepCache: 2 of every 3 steps run the U-Net's shallow part only
    pipe.disable_deepcache()

The tiling itself is :mod:`latentdiff.models.tiling`. Compiling wraps the modules the pipeline holds: each
module's ``forward`` becomes ``torch.compile(forward, mode=mode, dynamic=False)`` (its parameters and state dict
are untouched, so ``save()`` writes the same file); compilation happens on the first call of each input shape (a
new batch size or image size compiles again) and inductor caches its kernels on disk between runs. Where compiling
fails (no C/C++ toolchain, a backend the device lacks), the module runs eager from then on and one line on stderr
says why, never a traceback; an error that the eager module raises too is the caller's and propagates. Eager stays
the reference the fast path is tested against.

Fused projections (:func:`latentdiff.models.attention.fuse_qkv`) give the unfused outputs (float rounding aside)
and keep the state dict's names. LoRA files adapt ``to_q``, ``to_k``, ``to_v``: :meth:`fuse_qkv` is refused while
LoRAs are loaded, and ``load_lora`` splits fused projections back first (call :meth:`fuse_qkv` again after
``unload_lora``).

DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free", uniform 1:N strategy): within one
generate call, U-Net call i (one per sampler step, the guided batch included) is a full step when i % N == 0 and
caches the deep feature of skip branch k; the N - 1 calls after it run input blocks 0..k and the output blocks
from K - 1 - k on, reusing that feature (:meth:`UNetModel.forward_deepcache`). Every generate call starts a new
count, so results do not depend on what ran before. It approximates the model: its quality cost is measured in
BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from latentdiff.models.tiling import DEFAULT_TILE, VAETiling, check_tiling

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledForward:
    """A module's ``forward`` replaced by its compiled version, falling back to eager for good on the first failure
    of the compiler. ``first_call_s`` is the time of the first compiled call (compilation included); ``error`` the
    reason of a fallback (None while compiled). ``verbose``: say on stderr how long the first call took."""

    def __init__(self, name: str, module: torch.nn.Module, mode: str, verbose: bool = False, method: str = "forward"):
        self.name = name
        self.verbose = verbose
        self.eager = getattr(module, method)  # the class's bound forward (or forward_deepcache)
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


@dataclass(frozen=True)
class DeepCache:
    """DeepCache settings: a full U-Net step every ``interval`` calls, skip branch ``branch`` cached."""

    interval: int
    branch: int


class DeepCacheRun:
    """The U-Net of one generate call under DeepCache: ``run(x_t, t, context)`` like the U-Net's forward.

    Call i is a full step when i % interval == 0 (or when there is no cached feature of this batch size yet) and
    keeps the deep feature; the other calls are shallow steps on it. ``full_steps``/``shallow_steps`` count them.
    """

    def __init__(self, unet: torch.nn.Module, settings: DeepCache):
        self.unet, self.settings = unet, settings
        self.calls = self.full_steps = self.shallow_steps = 0
        self.deep: torch.Tensor | None = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        full = (self.calls % self.settings.interval == 0 or self.deep is None or self.deep.shape[0] != x_t.shape[0])
        out, deep = self.unet.forward_deepcache(x_t, t, context, self.settings.branch, None if full else self.deep)
        if full:
            self.deep = deep
            self.full_steps += 1
        else:
            self.shallow_steps += 1
        self.calls += 1
        return out


class FastPathMixin:
    """Tiling and compile switches for a pipeline holding ``unet`` and ``autoencoder`` (an AutoencoderKL)."""

    tiling: VAETiling = VAETiling()  # frozen, so one shared default is safe; enable_tiling sets the instance's own
    deepcache: DeepCache | None = None  # enable_deepcache sets the instance's own

    # -- step caching --------------------------------------------------------------------------------------------
    def enable_deepcache(self, interval: int = 3, branch: int = 1) -> None:
        """DeepCache from the next generate call on: a full U-Net step every ``interval`` sampler steps, the
        others running only the part of the U-Net above skip branch ``branch`` (0: conv_in's skip, the cheapest
        and roughest; up to len(unet.input_blocks) - 1). ``interval`` 1 is the plain U-Net. ValueError for values
        out of range."""
        K = len(self.unet.input_blocks)
        for name, value, low, high in (("interval", interval, 1, None), ("branch", branch, 0, K - 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and
                                                                                        value > high):
                top = "" if high is None else f" and at most {high} (this U-Net has {K} skip branches)"
                raise ValueError(f"DeepCache {name}={value!r} must be an integer of at least {low}{top}")
        self.deepcache = DeepCache(interval, branch)

    def disable_deepcache(self) -> None:
        """Every step runs the whole U-Net again."""
        self.deepcache = None

    def denoising_unet(self):
        """The U-Net callable ``(x_t, t, context) -> prediction`` of one generate call: the U-Net itself, or under
        DeepCache a new :class:`DeepCacheRun` (its step count starts at 0 for every call; after :meth:`compile`,
        on the U-Net's compiled DeepCache forward)."""
        if self.deepcache is None:
            return self.unet
        settings = self.__dict__.get("_compile_settings")
        if settings is not None and "forward_deepcache" not in self.unet.__dict__:
            self.unet.forward_deepcache = CompiledForward("unet (DeepCache)", self.unet, *settings,
                                                          method="forward_deepcache")
        return DeepCacheRun(self.unet, self.deepcache)

    # -- fused attention projections ----------------------------------------------------------------------------
    def fuse_qkv(self) -> int:
        """Fuse the U-Net's attention projections (q/k/v of self-attention, k/v of cross-attention) into one matrix
        product each; outputs and state-dict names are unchanged. Returns the number of layers fused now.
        ValueError while LoRAs are loaded (their files adapt to_q, to_k, to_v: unload_lora() first)."""
        if getattr(self, "loaded_loras", None):
            raise ValueError(f"LoRAs {[lo.name for lo in self.loaded_loras]} are loaded on the separate q/k/v "
                             "projections: unload_lora() before fuse_qkv()")
        return self.unet.fuse_qkv()

    def unfuse_qkv(self) -> int:
        """Separate q/k/v projections again; returns the number of layers that were fused."""
        return self.unet.unfuse_qkv()

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

    def compile(self, mode: str = "default", channels_last: bool = False, verbose: bool = False,
                fuse_qkv: bool = True) -> None:
        """torch.compile the U-Net and the VAE decoder (``mode`` one of COMPILE_MODES, static shapes), optionally in
        channels_last memory format, with the U-Net's attention projections fused first (``fuse_qkv``; skipped
        while LoRAs are loaded). The U-Net's DeepCache forward compiles on first use. Calling it again recompiles with
        the new settings; :meth:`uncompile` undoes it (and the fusion it made). Falls back to eager per module,
        with one line on stderr, where the compiler fails. ``verbose``: print each module's first-call (compile)
        time to stderr."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {mode!r} must be one of {COMPILE_MODES}")
        self.uncompile()
        if fuse_qkv and not getattr(self, "loaded_loras", None):
            self._compile_fused = self.fuse_qkv() > 0
        for name, module in self.compiled_modules().items():
            if channels_last:
                module.to(memory_format=torch.channels_last)
            module.forward = CompiledForward(name, module, mode, verbose)
        self._compile_settings = (mode, verbose)  # for the DeepCache forward, compiled on first use

    def uncompile(self) -> None:
        """Eager modules again, in the contiguous memory format, with separate q/k/v if compile fused them."""
        for module in self.compiled_modules().values():
            if isinstance(module.__dict__.get("forward"), CompiledForward):
                del module.forward
                module.to(memory_format=torch.contiguous_format)
        if isinstance(self.unet.__dict__.get("forward_deepcache"), CompiledForward):
            del self.unet.forward_deepcache
        self.__dict__.pop("_compile_settings", None)
        if self.__dict__.pop("_compile_fused", False):
            self.unfuse_qkv()

    def compile_report(self) -> dict[str, str]:
        """Per compiled module: "compiled, first call X s", "compiled, not called yet" or "eager (reason)"."""
        return {name: module.forward.report() for name, module in self.compiled_modules().items()
                if isinstance(module.__dict__.get("forward"), CompiledForward)}
