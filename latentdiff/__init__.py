"""latentdiff: latent and text-conditioned image diffusion in PyTorch.

    import latentdiff
    pipe = latentdiff.load_pipeline()          # the embedded default model
    images = pipe("a photo of a cat", steps=25, seed=0)

Importing the package is cheap (no torch): ``load_pipeline`` imports the pipelines on first use, so that
``latentdiff --help`` answers at once.
"""

from latentdiff.version import __version__

__all__ = ["__version__", "load_pipeline"]


def load_pipeline(path=None, device=None, dtype=None, **kwargs):
    """Load a text-to-image pipeline; see :func:`latentdiff.pipelines.load.load_pipeline`."""
    from latentdiff.pipelines.load import load_pipeline as _load

    return _load(path, device=device, dtype=dtype, **kwargs)
