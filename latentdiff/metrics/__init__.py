"""Evaluation metrics: FID (fid, frechet, inception, inception_weights, fid_helper) and CLIP score (clip_score).

Image sources are read by latentdiff.data.image_sources (shared with training's shard reader).

See docs/evaluation.md. Submodules are imported explicitly (``from latentdiff.metrics.fid import ...``) so that
importing one metric does not load the networks of the others.
"""
