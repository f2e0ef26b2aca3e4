"""Stable Diffusion 1.5's UNet architecture and noise schedule, built at random weights: the real-size network
for benchmarks and for checks that need no weights. (A user's SD1.5 folder loads through
Denoiser.from_pretrained instead.)"""
from __future__ import annotations

from torch import nn

from .schedules import NoiseSchedule

# runwayml/stable-diffusion-v1-5 unet/config.json, written out
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5, center_input_sample=False)


def sd15_unet() -> tuple[nn.Module, str]:
    """A random-weight UNet2DConditionModel with SD1.5's config, and the attention it uses: xformers when
    installed, else diffusers' default processor (torch SDPA)."""
    from diffusers import UNet2DConditionModel
    net = UNet2DConditionModel(**SD15_UNET_CONFIG)
    try:
        import xformers  # noqa: F401
        net.enable_xformers_memory_efficient_attention()
        return net, "xformers"
    except Exception:  # noqa: BLE001 - not installed, or no GPU build of it: keep SDPA
        return net, "sdpa"


def sd15_schedule() -> NoiseSchedule:
    """SD1.5's DDPM schedule: 1000 steps, scaled-linear betas from 0.00085 to 0.012."""
    return NoiseSchedule.vp(1000, 0.00085, 0.012, "scaled_linear")
