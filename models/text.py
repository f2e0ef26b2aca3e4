"""The parts a latent text-to-image teacher (Stable Diffusion) adds around its UNet, read from the same
diffusers folder:

    tokenizer/ + text_encoder/   prompts -> encoder_hidden_states (CLIP's last hidden state, SD1.5: 77 x 768)
    vae/                         latents -> images in [-1, 1] (AutoencoderKL, or AutoencoderTiny / TAESD)

Both are frozen. The decoder still passes gradients, because the regression loss compares decoded images.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .denoiser import ModelFolderError


def _need(folder: Path, part: str) -> Path:
    if not (folder / part).is_dir():
        raise ModelFolderError(f"model folder '{folder}' has no {part}/ (a Stable Diffusion folder has tokenizer/, "
                               f"text_encoder/, unet/, vae/ and scheduler/)")
    return folder / part


class PromptEncoder(nn.Module):
    """Prompts -> CLIP text embeddings, padded to the tokenizer's length as Stable Diffusion's pipeline does."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.text_encoder.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "PromptEncoder":
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging
        folder = Path(folder)
        tok = CLIPTokenizer.from_pretrained(_need(folder, "tokenizer"))
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar per load on stderr would bury the engine's one-line errors
        try:
            enc = CLIPTextModel.from_pretrained(_need(folder, "text_encoder"), dtype=torch.float32)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        return cls(tok, enc)

    @property
    def device(self):
        return next(self.text_encoder.parameters()).device

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """(N, L) token ids on the CPU, padded to the tokenizer's length: the text encoder's whole input."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.token_ids(prompts).to(self.device)).last_hidden_state


class LatentDecoder(nn.Module):
    """latents -> images in [-1, 1]: vae.decode(latents / scaling_factor), differentiable in the latents."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0))
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LatentDecoder":
        import json

        import diffusers
        folder = Path(folder)
        cfg = folder / "config.json"
        if not cfg.is_file():
            raise ModelFolderError(f"autoencoder folder '{folder}' has no config.json")
        name = json.loads(cfg.read_text()).get("_class_name", "AutoencoderKL")
        if name not in ("AutoencoderKL", "AutoencoderTiny"):
            raise ModelFolderError(f"{cfg}: unsupported autoencoder _class_name '{name}' (AutoencoderKL, AutoencoderTiny)")
        return cls(getattr(diffusers, name).from_pretrained(folder, torch_dtype=torch.float32,
                                                         low_cpu_mem_usage=False))

    @property
    def factor(self) -> int:
        """Pixels per latent along each side (SD1.5's VAE: 8)."""
        c = self.vae.config
        if "block_out_channels" in c:  # AutoencoderKL: one 2x upsampling between consecutive blocks
            return 2 ** (len(c.block_out_channels) - 1)
        return int(c.upsampling_scaling_factor) ** (len(c.decoder_block_out_channels) - 1)  # AutoencoderTiny

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        out = self.vae.decode((latents / self.scale + self.shift).to(dtype)).sample
        return out.to(latents.dtype)
