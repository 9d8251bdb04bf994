"""Evaluation metrics: FID (fid, frechet, inception, images, fid_helper) and CLIP score (clip_score).

See docs/evaluation.md. Submodules are imported explicitly (``from latentdiff.metrics.fid import ...``) so that
importing one metric does not load the networks of the others.
"""
