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

    def complete_pipeline(self, gen_folder: Path, schedule, prediction_type: str, timesteps=None):
        complete_pipeline(self.folder, gen_folder, schedule, prediction_type, timesteps)


# LCMScheduler's consistency boundary condition mixes the input back in: denoised = c_out * x0 + c_skip * x_t,
# c_skip = 0.25 / (0.25 + (t * scaling)^2). At its default scaling (10), c_skip is 2.5e-3 at t = 1 and 4e-8 at
# t = 249; at 1e4 it is under 2.5e-9 from t = 1 on and c_out rounds to 1 in float32: the step output is the
# generator's own x0 prediction, as OneStepGenerator computes it.
LCM_TIMESTEP_SCALING = 1e4


def pipeline_scheduler(schedule, prediction_type: str, timesteps=None):
    """The scheduler that makes the stock StableDiffusionPipeline run a generator's steps, and the call
    arguments that select them: (scheduler, {"num_inference_steps": K} or {"timesteps": [...]}).

    One step at T-1: DDIM, whose single 'trailing' step is T-1 and lands on the x0 prediction
    (set_alpha_to_one). Several steps (or one elsewhere): LCMScheduler, which at each step takes the x0
    prediction and, before every step but the last, noises it again to the next timestep with fresh noise
    drawn from the pipeline's generator: DMD2's multi-step sampler. Its num_inference_steps=K schedule is
    the K evenly spaced steps of original_inference_steps; when some value gives exactly the generator's
    steps (DMD2's [999, 749, 499, 249]: 4) that value is written, else the call must pass timesteps=."""
    from diffusers import DDIMScheduler, LCMScheduler
    p = schedule.params
    T = p["num_train_timesteps"]
    steps = [int(t) for t in timesteps] if timesteps else [T - 1]
    common = dict(num_train_timesteps=T, beta_start=p["beta_start"], beta_end=p["beta_end"],
                  beta_schedule=p["beta_schedule"], prediction_type=prediction_type, clip_sample=False,
                  set_alpha_to_one=True, steps_offset=1)  # 1: what StableDiffusionPipeline expects (LCM ignores it)
    if steps == [T - 1]:
        return DDIMScheduler(**common, timestep_spacing="trailing"), {"num_inference_steps": 1}
    if 0 in steps:  # c_skip = 1 at t = 0 whatever the scaling: the pipeline would return its input there
        raise ValueError(f"generator timesteps {steps}: a step at t = 0 cannot be run by the stock pipeline's "
                         f"LCMScheduler (its boundary condition returns the noisy input at t = 0)")
    lcm = lambda original: LCMScheduler(**common, timestep_scaling=LCM_TIMESTEP_SCALING,  # noqa: E731
                                        original_inference_steps=original)
    probe = lcm(T)
    for original in range(len(steps), T + 1):
        probe.set_timesteps(len(steps), original_inference_steps=original)
        if probe.timesteps.tolist() == steps:
            return lcm(original), {"num_inference_steps": len(steps)}
    # no even spacing gives these steps: with the whole T-step grid as the original schedule, timesteps= runs
    # them without diffusers' off-schedule warnings
    return probe, {"timesteps": steps}


def complete_pipeline(teacher_folder: Path, gen_folder: Path, schedule, prediction_type: str, timesteps=None):
    """Makes an exported generator folder a StableDiffusionPipeline folder that samples the generator's
    steps: the teacher's tokenizer, text encoder and VAE beside the generator's UNet, and the scheduler of
    `pipeline_scheduler`. dmd_model.json gets `pipeline_call`, the arguments that run those steps
    (num_inference_steps=K, or timesteps=[...] when the steps are not evenly spaced), and `start_sigma`."""
    gen_folder = Path(gen_folder)
    sched, call = pipeline_scheduler(schedule, prediction_type, timesteps)
    for part in PIPELINE_PARTS:
        shutil.copytree(Path(teacher_folder) / part, gen_folder / part, copy_function=_link_or_copy, dirs_exist_ok=True)
    sched.save_pretrained(gen_folder / "scheduler")
    index = Path(teacher_folder) / "model_index.json"
    teacher_index = json.loads(index.read_text()) if index.is_file() else {}
    model_index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", type(sched).__name__],
                   "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": teacher_index.get("vae", ["diffusers", "AutoencoderKL"]),
                   "text_encoder": teacher_index.get("text_encoder", ["transformers", "CLIPTextModel"]),
                   "tokenizer": teacher_index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}
    (gen_folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    meta_path = gen_folder / "dmd_model.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["pipeline_call"] = {**call, "guidance_scale": 1.0}  # guidance was distilled into the generator
    # the pipeline starts from unit noise, the generator from sigma_{t_0} z (0.9977 z at t_0 = 999 on SD1.5's
    # schedule): latents=start_sigma * z gives the generator's exact start
    t0 = int(timesteps[0]) if timesteps else schedule.T - 1
    meta["start_sigma"] = float(schedule.sigma[t0])
    meta_path.write_text(json.dumps(meta, indent=2))


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
