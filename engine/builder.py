"""The engine class: builds the teacher, the generator, the fake score, their optimisers and the EMA from a
config. The trainer (engine/trainer.py) owns only the per-step maths.

    teacher   mu_real, frozen                         (kind unet: diffusers folder; toy2d: exact mixture)
    generator G, initialised from the teacher, run at its last timestep
    fake      mu_fake, a trainable copy of the teacher (toy2d: a fresh MLP, warmed up on G's samples)
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import resource
from pathlib import Path

import torch

from models import Denoiser, OneStepGenerator, trainable_copy, weights_hash
from models.toy import GaussianMixtureDenoiser, ToyGenerator, mlp_denoiser

from .cli import DMDError

ROOT = Path(__file__).resolve().parents[1]


def resolve_path(p: str) -> Path:
    """A path as given, else relative to the repository root (so shipped assets work from any cwd)."""
    path = Path(p)
    if path.exists() or path.is_absolute():
        return path
    return ROOT / path if (ROOT / path).exists() else path


def resolve_device(choice: str) -> torch.device:
    """train.device: auto = the first CUDA device when there is one, else the CPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cuda", "cpu") and not choice.startswith("cuda:"):
        raise DMDError(f"train.device must be auto, cuda, cuda:N or cpu, got '{choice}'")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise DMDError(f"train.device is '{choice}' but torch sees no CUDA device (set it to auto or cpu)")
    return torch.device(choice)


def load_teacher(cfg) -> tuple[Denoiser, str]:
    """Returns (teacher, weights hash)."""
    if cfg.model.kind == "toy2d":
        t = GaussianMixtureDenoiser()
        h = hashlib.sha256(repr((t.means.tolist(), t.std, t.log_w.tolist())).encode()).hexdigest()
        return t, h
    if cfg.model.kind not in ("unet", "sd15"):
        raise DMDError(f"model.kind must be 'unet', 'sd15' or 'toy2d', got '{cfg.model.kind}'")
    if not cfg.model.teacher:
        raise DMDError("model.teacher is empty: set it to the teacher's diffusers folder")
    folder = resolve_path(cfg.model.teacher)
    teacher = Denoiser.from_pretrained(folder)
    return teacher, weights_hash(folder)


def load_generator(run_dir: Path, kind: str):
    folder = Path(run_dir) / "generator"
    if not folder.is_dir():
        raise DMDError(f"'{run_dir}' holds no generator/ folder (not a finished or checkpointed run)")
    return ToyGenerator.from_pretrained(folder) if kind == "toy2d" else OneStepGenerator.from_pretrained(folder)


def _adamw(params, lr, tc):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)


class TeacherShapes:
    """What the trainer and samplers read off the teacher; shared by DMDModels and zero.ZeroDMDModels.
    Conditions are drawn as integers: class labels, or for text models (self.text) prompt indices, which
    `condition` turns into embeddings; `to_images` decodes a latent model's samples."""
    text = None  # engine.text2image.TextToImage for latent text-to-image teachers

    @property
    def num_classes(self):
        return self.text.num_prompts if self.text is not None else self.teacher.num_classes

    @property
    def sample_shape(self):
        return tuple(self.teacher.sample_shape)

    def condition(self, idx):
        return self.text.embed(idx) if self.text is not None and idx is not None else idx

    def to_images(self, x):
        return self.text.decode(x) if self.text is not None else x


def rank_slice(x, rank: int, world: int):
    """Process `rank`'s contiguous share of a global batch (dim 0): how every ZeRO-3 rank keeps its samples."""
    if x is None or world == 1:
        return x
    n = x.shape[0] // world
    return x[rank * n: (rank + 1) * n]


def process_peak_mib(device: torch.device) -> float:
    """This process's peak memory: torch.cuda.max_memory_allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextlib.contextmanager
def eval_mode(module):
    """`module` in eval mode for the block, then back in the mode it was in."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


class DMDModels(TeacherShapes):
    def __init__(self, cfg, device="cpu", teacher: tuple | None = None):
        """teacher: (Denoiser, hash) built by the caller instead of loaded from cfg.model (benchmarks)."""
        tc = cfg.train
        self.cfg, self.device = cfg, torch.device(device)
        self.teacher, self.teacher_hash = teacher or load_teacher(cfg)
        self.teacher.to(self.device).eval().requires_grad_(False)
        from .text2image import load_text
        self.text = load_text(cfg, self.teacher, self.device)  # before the copies: they share its null condition
        if cfg.model.kind == "toy2d":
            self.generator = ToyGenerator(cfg.model.toy_hidden)
            self.fake = mlp_denoiser(cfg.model.toy_hidden)
        else:
            self.generator = OneStepGenerator(trainable_copy(self.teacher))
            self.fake = trainable_copy(self.teacher)
        self.generator.to(self.device).train().requires_grad_(True)
        self.fake.to(self.device).train().requires_grad_(True)
        self.opt_g = _adamw(self.generator.parameters(), tc.lr_generator, tc)
        self.opt_f = _adamw(self.fake.parameters(), tc.lr_fake, tc)
        self.ema = copy.deepcopy(self.generator).requires_grad_(False).eval() if tc.ema_decay > 0 else None

    # --- update mechanics: DMDTrainer calls these, so the single-process and ZeRO paths share its maths ----
    world_size, rank = 1, 0

    def local(self, x):
        """This process's slice of a global batch (all of it here; engine.zero.ZeroDMDModels slices)."""
        return x

    def backward(self, name: str, loss) -> float:
        """Gradients of `loss` for "generator" or "fake"; returns their global norm before clipping.
        Nothing is applied until step(name); discard(name) drops them instead."""
        model, opt = self._trained(name)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.train.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip))
        return float(torch.norm(torch.stack([p.grad.detach().norm() for p in params])))

    def step(self, name: str):
        self._trained(name)[1].step()
        if name == "generator":
            self.update_ema()

    def discard(self, name: str):
        self._trained(name)[1].zero_grad(set_to_none=True)

    def mean_over_ranks(self, values: dict) -> dict:
        return values

    is_main = True

    def barrier(self):
        pass

    def autocast(self):
        return contextlib.nullcontext()

    def lrs(self) -> dict:
        return {"lr_generator": self.opt_g.param_groups[0]["lr"], "lr_fake": self.opt_f.param_groups[0]["lr"]}

    def peak_memory_mib(self) -> list[float]:
        """One entry per rank (here one): see process_peak_mib."""
        return [process_peak_mib(self.device)]

    def _trained(self, name):
        return (self.generator, self.opt_g) if name == "generator" else (self.fake, self.opt_f)

    @contextlib.contextmanager
    def sampling(self):
        """The generator that samples and exports use: the EMA when enabled, in eval mode for the block (no
        dropout in samples, and sampling draws nothing from the training RNG). A context manager because the
        ZeRO-3 engine swaps its partitioned EMA in for the block."""
        with eval_mode(self.ema if self.ema is not None else self.generator) as gen:
            yield gen

    def generator_state_dict(self):
        """None: the sampling generator holds its own weights (ZeRO-3 gathers them here)."""
        return None

    @torch.no_grad()
    def update_ema(self):
        if self.ema is None:
            return
        d = self.cfg.train.ema_decay
        for pe, pg in zip(self.ema.parameters(), self.generator.parameters()):
            pe.lerp_(pg, 1 - d)

    def state_dict(self):
        s = {"generator": self.generator.state_dict(), "fake": self.fake.state_dict(),
             "opt_g": self.opt_g.state_dict(), "opt_f": self.opt_f.state_dict()}
        if self.ema is not None:
            s["ema"] = self.ema.state_dict()
        return s

    def load_state_dict(self, s):
        self.generator.load_state_dict(s["generator"])
        self.fake.load_state_dict(s["fake"])
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_f.load_state_dict(s["opt_f"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
