"""Tiny model configs shared by tests (seconds on a CPU)."""

from latentdiff.config import model_config_from_dict


def tiny_ldm_config(**overrides):
    data = {
        "image_size": 16,
        "guidance_scale": 3.0,
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [2], "num_heads": 2,
                 "context_dim": 32, "norm_num_groups": 8},
        "autoencoder": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_num_groups": 8},
        "text_encoder": {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
        "schedule": {"num_timesteps": 100},
    }
    data.update(overrides)
    return model_config_from_dict(data)
