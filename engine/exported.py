"""Everything sampling a generator needs, read from a generator folder alone (or a run folder's generator/).

    unet    generator/ = unet/ (UNet2DModel) + scheduler/ + dmd_model.json (classes, sample shape, timesteps)
    sd15    the same with UNet2DConditionModel, plus tokenizer/, text_encoder/ and vae/: a StableDiffusionPipeline
            folder (engine/text2image.py completes it at export)
    toy2d   config.json (ToyGenerator) + model.safetensors

A run folder adds only defaults: its data.prompts and its model.decoder. The teacher is never read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import OneStepGenerator
from models.text import LatentDecoder, PromptEncoder

from .errors import DMDError
from .files import resolve_path
from .kinds import generator_folder_kind, load_generator, model_kind
from .sampling import noise_shape, steps_label
from .text2image import PIPELINE_PARTS, load_prompts


@dataclass
class GeneratorParts:
    folder: Path
    kind: str                                   # unet, sd15 or toy2d
    generator: nn.Module
    noise_shape: tuple                          # the unit noise one sample takes (K-step: K noises on channels)
    num_classes: int | None = None
    sample_shape: tuple = ()                    # what one sample is (latents for text kinds)
    timesteps: list[int] = field(default_factory=list)  # the generator's steps; empty for the toy
    encoder: PromptEncoder | None = None        # text kinds
    decoder: LatentDecoder | None = None        # text kinds
    prompts: list[str] = field(default_factory=list)  # text kinds: the run's data.prompts, when readable

    @property
    def text(self) -> bool:
        return self.encoder is not None

    @property
    def num_steps(self) -> int:
        """Network evaluations per sample."""
        return max(1, len(self.timesteps))

    def describe(self, details: str = "") -> str:
        """e.g. '4-step generator (timesteps 999, 749, 499, 249; details)'."""
        return steps_label(self.timesteps, details)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder.token_ids(prompts)


def is_run_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "generator").is_dir()


def generator_kind(folder: Path) -> str:
    """The generator folder's kind (engine/kinds.py decides), with a text generator's pipeline parts checked."""
    kind = generator_folder_kind(folder)
    missing = [p for p in PIPELINE_PARTS if not (folder / p).is_dir()] if model_kind(kind).text else []
    if missing:
        raise DMDError(f"text generator folder '{folder}' lacks {', '.join(p + '/' for p in missing)} (an exported "
                       f"text generator is a whole StableDiffusionPipeline folder)")
    return kind


def open_generator(path, decoder: str | None = None) -> GeneratorParts:
    """The generator of a run folder or an exported generator folder, with what sampling it needs.
    decoder: an autoencoder folder (e.g. AutoencoderTiny) to decode with instead of the folder's vae/."""
    path = Path(path)
    if not path.is_dir():
        raise DMDError(f"--checkpoint: folder '{path}' not found")
    cfg, prompts = None, []
    if is_run_folder(path):
        from .config import DMDConfig, load
        cfg = load(path / "config.json", DMDConfig)
        decoder = decoder or (cfg.model.decoder or None)
        if cfg.data.prompts:
            try:
                prompts = load_prompts(cfg.data.prompts)
            except DMDError:
                prompts = []  # moved or deleted: --prompt/--prompts still work
        path = path / "generator"
    kind = generator_kind(path)
    if cfg is not None and cfg.model.kind != kind:
        raise DMDError(f"{path}: holds a {kind} generator but the run's model.kind is '{cfg.model.kind}'")
    mk = model_kind(kind)
    gen = load_generator(path, kind)
    d = getattr(gen, "denoiser", None)  # the toy's MLP generator has none
    shape, classes = (tuple(d.sample_shape), d.num_classes) if d is not None else (tuple(gen.noise_shape), None)
    parts = GeneratorParts(path, kind, gen, noise_shape(gen, shape), classes, shape,
                           list(getattr(gen, "timesteps", [])), prompts=prompts)
    if mk.text:
        parts.encoder = PromptEncoder.from_pretrained(path)
        dec = resolve_path(decoder) if decoder else path / "vae"
        parts.decoder = LatentDecoder.from_pretrained(dec)
    elif decoder:
        raise DMDError(f"--decoder applies to latent text-to-image generators; '{path}' is a {kind} generator")
    return parts


def export_initial(teacher_folder, out, dtype=torch.float32, timesteps=None) -> Path:
    """The generator a run starts from (the teacher at its last timestep, DMD Sec. 3.1; at `timesteps`, e.g.
    DMD2's [999, 749, 499, 249], for a multi-step one), exported as train.py exports a trained one:
    sampling-path tests and benchmarks use it where no trained generator exists."""
    from models import Denoiser

    from .text2image import complete_pipeline
    teacher_folder, out = Path(teacher_folder), Path(out)
    d = Denoiser.from_pretrained(teacher_folder, dtype)  # benchmarks write SD1.5-size weights in half precision
    cfg = d.net.config
    if getattr(cfg, "cross_attention_dim", None):  # text: latent noise at the UNet's own sample size
        d.sample_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    gen = OneStepGenerator(d, timesteps=timesteps)
    gen.save_pretrained(out)
    if getattr(cfg, "cross_attention_dim", None):
        complete_pipeline(teacher_folder, out, d.schedule, d.prediction_type, gen.timesteps)
    return out
