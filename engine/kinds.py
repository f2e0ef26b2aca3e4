"""model.kind, decided in one place: what each kind of teacher loads, which trainable models it starts, how
an exported generator is read back, and which backends and extras it needs. A new kind is one new entry.

    unet   class-conditional pixel-space teacher from a diffusers folder (UNet2DModel)
    sd15   latent text-to-image teacher from a Stable Diffusion folder (UNet2DConditionModel + CLIP + VAE)
    toy2d  the paper's Fig. 3: an exact 2-D Gaussian-mixture teacher, MLP generator and fake score
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from models import Denoiser, OneStepGenerator, trainable_copy, weights_hash
from models.toy import GaussianMixtureDenoiser, ToyGenerator, mlp_denoiser

from .errors import DMDError
from .files import resolve_path


SINGLE_FILE = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def teacher_folder(cfg) -> Path:
    """model.teacher as a diffusers folder, or one line saying what it is instead (checked before any work)."""
    if not cfg.model.teacher:
        raise DMDError("model.teacher is empty: set it to the teacher's diffusers folder")
    folder = resolve_path(cfg.model.teacher)
    if folder.is_file():
        hint = ""
        if folder.suffix in SINGLE_FILE:
            hint = (f"; for a Stable Diffusion checkpoint, make one with diffusers' own conversion: python -c "
                    f"\"from diffusers import StableDiffusionPipeline as P; "
                    f"P.from_single_file('{folder}').save_pretrained('{folder.with_suffix('')}')\"")
        raise DMDError(f"model.teacher '{folder}' is a single file; the engine needs a diffusers folder "
                       f"(unet/, scheduler/ and, for text models, text_encoder/, tokenizer/, vae/){hint}")
    if not folder.is_dir():
        raise DMDError(f"model.teacher: folder '{folder}' not found")
    return folder


def _folder_teacher(cfg) -> tuple[Denoiser, str]:
    folder = teacher_folder(cfg)
    return Denoiser.from_pretrained(folder), weights_hash(folder)


def _toy_teacher(cfg) -> tuple[Denoiser, str]:
    t = GaussianMixtureDenoiser()
    return t, hashlib.sha256(repr((t.means.tolist(), t.std, t.log_w.tolist())).encode()).hexdigest()


def _check_resolution(cfg, teacher):
    """A pixel-space teacher samples at one size: data.resolution must name it, not be silently ignored."""
    side = teacher.sample_shape[-1]
    if cfg.data.resolution != side:
        raise DMDError(f"data.resolution = {cfg.data.resolution} but the teacher {cfg.model.teacher} makes "
                       f"{side}x{side} samples; set data.resolution to {side}")


def _no_check(cfg, teacher):
    pass


def _copies(cfg, teacher) -> tuple[nn.Module, nn.Module]:
    """DMD Sec. 3.1: the generator and the fake score both start as copies of the teacher."""
    return generator_of(trainable_copy(teacher), cfg), trainable_copy(teacher)


def generator_of(denoiser: Denoiser, cfg) -> OneStepGenerator:
    """The generator on a copy of the teacher, at train.generator_timesteps (one step at T-1 by default)."""
    try:
        return OneStepGenerator(denoiser, timesteps=cfg.train.generator_timesteps)
    except ValueError as e:
        raise DMDError(f"train.generator_timesteps: {e}") from None


def _toy_models(cfg, teacher) -> tuple[nn.Module, nn.Module]:
    return ToyGenerator(cfg.model.toy_hidden), mlp_denoiser(cfg.model.toy_hidden)


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _unet_generator(folder: Path) -> bool:
    return (folder / "unet" / "config.json").is_file() and _class_name(folder / "unet" / "config.json") != "UNet2DConditionModel"


def _text_generator(folder: Path) -> bool:
    return _class_name(folder / "unet" / "config.json") == "UNet2DConditionModel"


def _toy_generator(folder: Path) -> bool:
    return _class_name(folder / "config.json") == "ToyGenerator"


@dataclass(frozen=True)
class ModelKind:
    name: str
    load_teacher: Callable      # cfg -> (frozen teacher Denoiser, weights hash)
    trainables: Callable        # (cfg, teacher) -> (generator, fake score), built in that order (RNG draws)
    load_generator: Callable    # exported generator folder -> module
    is_generator_folder: Callable  # folder -> bool: an exported generator of this kind
    check: Callable = _no_check  # (cfg, teacher): refuses a config the teacher cannot serve, before any work
    folder: bool = True         # the teacher is a diffusers folder (so ZeRO-3 can build it partitioned)
    text: bool = False          # latent text-to-image: prompts, text encoder and decoder (engine/text2image.py)


KINDS = {
    "unet": ModelKind("unet", _folder_teacher, _copies, OneStepGenerator.from_pretrained, _unet_generator,
                      _check_resolution),
    "sd15": ModelKind("sd15", _folder_teacher, _copies, OneStepGenerator.from_pretrained, _text_generator, text=True),
    "toy2d": ModelKind("toy2d", _toy_teacher, _toy_models, ToyGenerator.from_pretrained, _toy_generator, folder=False),
}


def model_kind(name: str) -> ModelKind:
    if name not in KINDS:
        raise DMDError(f"model.kind must be one of {', '.join(KINDS)}, got '{name}'")
    return KINDS[name]


def load_teacher(cfg) -> tuple[Denoiser, str]:
    """The frozen teacher (eval mode) and the hash of its weights."""
    kind = model_kind(cfg.model.kind)
    teacher, h = kind.load_teacher(cfg)
    kind.check(cfg, teacher)
    return teacher.eval().requires_grad_(False), h


def generator_folder_kind(folder: Path) -> str:
    """The kind of an exported generator folder, read from its files, or one line saying it is none."""
    for name, kind in KINDS.items():
        if kind.is_generator_folder(Path(folder)):
            return name
    raise DMDError(f"'{folder}' is neither a run folder (config.json + generator/) nor an exported generator "
                   f"folder (unet/ + scheduler/ + dmd_model.json, or a toy generator's config.json)")


def load_generator(folder: Path, kind: str) -> nn.Module:
    folder = Path(folder)
    if not folder.is_dir():
        raise DMDError(f"'{folder.parent}' holds no generator/ folder (not a finished or checkpointed run)")
    return model_kind(kind).load_generator(folder)
