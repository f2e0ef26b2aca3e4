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
    installed, else torch SDPA (models/attention.py)."""
    from diffusers import UNet2DConditionModel

    from .attention import AttentionError, use_attention, xformers_available
    net = UNet2DConditionModel(**SD15_UNET_CONFIG)
    if xformers_available():
        try:
            return net, use_attention([net], "xformers")
        except AttentionError:  # a build without CUDA kernels: keep SDPA
            pass
    return net, use_attention([net], "sdpa")


def sd15_schedule() -> NoiseSchedule:
    """SD1.5's DDPM schedule: 1000 steps, scaled-linear betas from 0.00085 to 0.012."""
    return NoiseSchedule.vp(1000, 0.00085, 0.012, "scaled_linear")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses (GPT-2's byte-to-unicode table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def make_tiny_sd(folder, seed: int = 0, max_length: int = 16):
    """A Stable-Diffusion-layout folder at random weights and toy size, made here (no download): a CLIP
    tokenizer whose vocabulary is single characters, a 2-layer CLIP text encoder, a 2-level cross-attention
    UNet on 4x8x8 latents, a 2-level AutoencoderKL (16x16 images) and SD1.5's schedule. For tests and the
    CPU walk-through of the sd15 path; StableDiffusionPipeline.from_pretrained reads it."""
    return make_sd_folder(folder, "tiny", seed, max_length)


def make_sd_folder(folder, size: str = "tiny", seed: int = 0, max_length: int | None = None, device="cpu",
                   dtype=None):
    """A Stable Diffusion folder at random weights: size "tiny" (see make_tiny_sd) or "sd15", SD1.5's own
    text encoder, UNet and VAE configs (512 px; ~1.07 B parameters) for benchmarks that need the real
    architecture and no weights. Both use the character-level tokenizer (SD1.5: 77 tokens)."""
    import json
    import shutil
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    if size not in ("tiny", "sd15"):
        raise ValueError(f"size must be tiny or sd15, got '{size}'")
    folder = Path(folder)
    max_length = max_length or (16 if size == "tiny" else 77)
    syms = _byte_symbols()
    vocab = {s: i for i, s in enumerate(syms + [s + "</w>" for s in syms] + ["<|startoftext|>", "<|endoftext|>"])}
    tdir = folder / ".vocab"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "vocab.json").write_text(json.dumps(vocab))
    (tdir / "merges.txt").write_text("#version: 0.2\n")  # no merges: every word splits into characters
    tok = CLIPTokenizer(str(tdir / "vocab.json"), str(tdir / "merges.txt"), model_max_length=max_length)
    torch.manual_seed(seed)
    eot = vocab["<|endoftext|>"]
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=eot, pad_token_id=eot)
    with torch.device(device):  # SD1.5-size weights are drawn where they will run
        if size == "tiny":
            text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2,
                                                max_position_embeddings=max_length, **ids))
            unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                        attention_head_dim=8, norm_num_groups=8)
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
                                norm_num_groups=8, sample_size=16)
        else:
            text = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT_CONFIG, **ids}))
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
            vae = AutoencoderKL(**SD15_VAE_CONFIG, scaling_factor=0.18215)
    if dtype is not None:
        text, unet, vae = (m.to(dtype) for m in (text, unet, vae))
    p = sd15_schedule().params
    sch = DDIMScheduler(beta_start=p["beta_start"], beta_end=p["beta_end"], beta_schedule=p["beta_schedule"],
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sch, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    shutil.rmtree(tdir)
    return folder


# runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14's text tower) and vae/config.json
SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                       block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
