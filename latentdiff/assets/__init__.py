"""Files shipped inside the package (installed with it as package data): the embedded models, their model cards,
the judging classifier of the text-to-image benchmark, and the Stable Diffusion family configs the checkpoint
loaders need. This module only names their paths; it imports nothing from latentdiff.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = ASSETS_DIR / "default.safetensors"  # latentdiff-cifar10 latent diffusion (MODEL_CARD.md)
DEFAULT_VQ_MODEL = ASSETS_DIR / "default_vq.safetensors"  # latentdiff-cifar10-vq VQ-Diffusion (MODEL_CARD_VQ.md)
EMBEDDED_MODELS = {"default": DEFAULT_MODEL, "default-vq": DEFAULT_VQ_MODEL}  # names load_pipeline accepts
CIFAR10_CLASSIFIER = ASSETS_DIR / "cifar10_classifier.safetensors"  # judge of tools/eval_t2i.py
SD_CONFIGS_DIR = ASSETS_DIR / "configs"  # sd15.yaml, sd2_base.yaml, sd2_768_v.yaml
