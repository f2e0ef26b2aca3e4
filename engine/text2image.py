"""Latent text-to-image teachers (model.kind "sd15"): what they need beyond a class-conditional UNet.

The condition every model sees is a prompt's CLIP embedding; the trainer, the pairs and the samplers still
draw integer indices (into data.prompts), exactly as they draw class labels, and `TextToImage.embed` turns
them into embeddings. Samples are latents: `decode` makes images of them for grids, samples.npz and the
regression loss, which DMD computes on decoded images (METHOD.md, step 3).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from models.text import LatentDecoder, PromptEncoder

from .errors import DMDError
from .files import resolve_path
from .kinds import model_kind

PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae")  # copied from the teacher into the exported generator


def load_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped. The empty prompt is reserved for guidance."""
    if not path:
        raise DMDError("data.prompts is empty: set it to a text file with one prompt per line")
    p = resolve_path(path)
    if not p.is_file():
        raise DMDError(f"data.prompts: file '{p}' not found")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DMDError(f"data.prompts: '{p}' holds no prompts")
    return prompts


class TextToImage:
    """Prompts -> embeddings and latents -> images for one run; both networks frozen, on `device`."""

    def __init__(self, cfg, folder: Path, device="cpu", dtype=torch.float32):
        if cfg.data.dataset != "prompts":
            raise DMDError(f"model.kind '{cfg.model.kind}' needs data.dataset 'prompts', got '{cfg.data.dataset}'")
        self.folder = Path(folder)
        self.prompts = load_prompts(cfg.data.prompts)
        self.encoder = PromptEncoder.from_pretrained(self.folder).to(device, dtype)
        dec = resolve_path(cfg.model.decoder) if cfg.model.decoder else self.folder / "vae"
        self.decoder = LatentDecoder.from_pretrained(dec).to(device, dtype)
        self.resolution = cfg.data.resolution
        if self.resolution % self.decoder.factor:
            raise DMDError(f"data.resolution = {self.resolution} is not a multiple of the autoencoder's factor "
                           f"{self.decoder.factor} ({dec})")
        self.null = self.encoder([""])  # the unconditional input for classifier-free guidance
        self.prompts_hash = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    def latent_shape(self, channels: int) -> tuple[int, int, int]:
        side = self.resolution // self.decoder.factor
        return channels, side, side

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.encoder([self.prompts[i] for i in idx.tolist()])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def complete_pipeline(self, gen_folder: Path, schedule, prediction_type: str):
        complete_pipeline(self.folder, gen_folder, schedule, prediction_type)


def complete_pipeline(teacher_folder: Path, gen_folder: Path, schedule, prediction_type: str):
    """Makes an exported generator folder a StableDiffusionPipeline folder that samples in one step:
    the teacher's tokenizer, text encoder and VAE beside the generator's UNet, and a DDIM scheduler
    whose single 'trailing' step is t = T-1 and lands on the x0 prediction (set_alpha_to_one)."""
    from diffusers import DDIMScheduler
    gen_folder = Path(gen_folder)
    for part in PIPELINE_PARTS:
        shutil.copytree(Path(teacher_folder) / part, gen_folder / part, copy_function=_link_or_copy, dirs_exist_ok=True)
    p = schedule.params
    DDIMScheduler(num_train_timesteps=p["num_train_timesteps"], beta_start=p["beta_start"], beta_end=p["beta_end"],
                  beta_schedule=p["beta_schedule"], prediction_type=prediction_type, clip_sample=False,
                  set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1).save_pretrained(gen_folder / "scheduler")
    index = Path(teacher_folder) / "model_index.json"
    teacher_index = json.loads(index.read_text()) if index.is_file() else {}
    model_index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                   "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": teacher_index.get("vae", ["diffusers", "AutoencoderKL"]),
                   "text_encoder": teacher_index.get("text_encoder", ["transformers", "CLIPTextModel"]),
                   "tokenizer": teacher_index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}
    (gen_folder / "model_index.json").write_text(json.dumps(model_index, indent=2))


def _link_or_copy(src, dst):
    """Hard links where the file system allows (the teacher's files never change), else a copy."""
    try:
        if os.path.exists(dst):
            os.unlink(dst)
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def load_text(cfg, teacher, device="cpu", dtype=torch.float32) -> TextToImage | None:
    """For text-to-image kinds: the run's TextToImage, with the teacher given its null condition and its
    latent sample shape at data.resolution. None for class-conditional kinds."""
    if not model_kind(cfg.model.kind).text:
        return None
    text = TextToImage(cfg, resolve_path(cfg.model.teacher), device, dtype)
    teacher.null_cond = text.null
    teacher.sample_shape = text.latent_shape(teacher.sample_shape[0])
    return text


class DecodedRegression(nn.Module):
    """A regression loss on decoded images: loss(decode(x), decode(y)); y's decode carries no gradient."""

    def __init__(self, loss: nn.Module, decode):
        super().__init__()
        self.loss, self.decode = loss, decode
        self.backbone = getattr(loss, "backbone", None)

    def forward(self, x, y):
        with torch.no_grad():
            y_img = self.decode(y)
        return self.loss(self.decode(x), y_img)


def condition_count(teacher, text) -> int | None:
    """How many conditions are drawn: prompts for text models, else the teacher's classes (None: unconditional)."""
    return text.num_prompts if text is not None else teacher.num_classes
