"""latentdiff: latent and text-conditioned image diffusion in PyTorch.

    import latentdiff
    pipe = latentdiff.load_pipeline()          # the embedded default model
    images = pipe("a photo of a cat", steps=25, seed=0)
"""

__version__ = "0.1.0"


def load_pipeline(path=None, device=None, dtype=None, **kwargs):
    """Load a text-to-image pipeline; see :func:`latentdiff.pipelines.load_pipeline`."""
    from latentdiff.pipelines import load_pipeline as _load

    return _load(path, device=device, dtype=dtype, **kwargs)
