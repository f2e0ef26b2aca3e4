"""The backend interface: everything the trainer, checkpointing and the entry points may call on the models.

    engine/plain.py  PlainBackend  one process, plain PyTorch, whole models on one device
    engine/zero.py   ZeroBackend   DeepSpeed ZeRO-3 on one or many processes, every model partitioned

Both hold the same three models (DMD Sec. 3): `teacher` (mu_real, frozen), `generator` (G, run at the
teacher's last timestep) and `fake` (mu_fake, a trainable copy of the teacher), plus `text` for latent
text-to-image kinds. What both do alike is written here once: conditioning and decoding, the per-process slice
of a global batch, step (apply, then EMA), the EMA update, the sampling context, the export, optimiser
construction. Each backend writes only what differs: how its models are built, how gradients are made,
applied or dropped, what crosses processes, and where checkpoints go.
"""
from __future__ import annotations

import abc
import contextlib
import resource
from pathlib import Path

import torch

from .errors import DMDError
from .text2image import condition_count


def adamw(params, lr: float, tc) -> torch.optim.AdamW:
    """The optimiser of both trained models, in both backends (train.betas, train.weight_decay)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)


def warmup_scheduler(opt, warm: int):
    """deepspeed.lr_warmup_steps, both backends: linear warm-up to the configured rate over `warm` updates,
    then constant (0 = constant from the start; DMD2 warms up too)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)


def set_dropout(choice: str, *modules) -> int:
    """train.dropout for the trained copies: "none" (DMD2: every dropout layer at p = 0, so the generator and
    the fake score see what the teacher, in eval mode, sees) or "teacher" (keep the teacher's rates, the
    original DMD engine's behaviour). Returns how many layers were zeroed."""
    if choice == "teacher":
        return 0
    if choice != "none":
        raise DMDError(f"train.dropout must be none or teacher, got '{choice}'")
    layers = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in layers:
        m.p = 0.0
    return len(layers)


def gan_on(tc) -> bool:
    """DMD2's GAN is on when either of its weights is (train.gan_weight_generator / gan_weight_fake)."""
    return tc.gan_weight_generator > 0 or tc.gan_weight_fake > 0


def attach_gan_head(fake, cfg, early_exit: bool):
    """The fake score's discriminator head (models/gan.py), when the GAN is on: built whole on the CPU from
    train.seed alone, so every process and both backends start from the same head whatever the global RNG
    has drawn (ZeRO-3 partitions it with the rest of the fake score at initialisation). `early_exit`: D's
    passes may end the fake score's forward at its mid block (same logits and gradients, the up path skipped)."""
    if not gan_on(cfg.train):
        return None
    from models.gan import attach_head
    if getattr(getattr(fake, "net", None), "mid_block", None) is None:
        raise DMDError(f"train.gan_weight_generator / gan_weight_fake need a UNet teacher with a mid block "
                       f"(model.kind unet or sd15), not model.kind '{cfg.model.kind}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 7919)
        head = attach_head(fake, early_exit=early_exit)
    return head.float().train().requires_grad_(True)


@contextlib.contextmanager
def frozen(module):
    """`module`'s parameters without gradients for the block: a loss may pass through it (the generator's GAN
    loss through the fake score) without giving it gradients, which under ZeRO-3 would be reduced into its
    pending update."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


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


def dtype_choice(choice: str, key: str, device: torch.device) -> torch.dtype:
    """deepspeed.precision and deepspeed.teacher_dtype, read by both backends: "auto" = bf16 on a GPU, fp32
    elsewhere. Trained models keep fp32 master weights either way; bf16 is their compute dtype."""
    if choice == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if choice not in ("fp32", "bf16"):
        raise DMDError(f"deepspeed.{key} must be auto, fp32 or bf16, got '{choice}'")
    return torch.bfloat16 if choice == "bf16" else torch.float32


@contextlib.contextmanager
def eval_mode(module):
    """`module` in eval mode for the block, then back in the mode it was in."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


class Backend(abc.ABC):
    """Attributes every backend sets: cfg, device, kind (engine.kinds.ModelKind), teacher, teacher_hash,
    generator, fake, text (None for class-conditional kinds), rank and world_size."""
    name: str                     # summary.json's "engine"
    rank, world_size = 0, 1
    text = None                   # engine.text2image.TextToImage for latent text-to-image kinds
    partitioned = False           # models split over processes (no process holds a whole one)

    # --- conditions and samples ------------------------------------------------------------------------
    # Conditions are drawn as integers: class labels, or for text models prompt indices, which `condition`
    # turns into embeddings; `to_images` decodes a latent model's samples.
    @property
    def num_classes(self) -> int | None:
        return condition_count(self.teacher, self.text)

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.teacher.sample_shape)

    def condition(self, idx):
        return self.text.embed(idx) if self.text is not None and idx is not None else idx

    def to_images(self, x):
        return self.text.decode(x) if self.text is not None else x

    @property
    def is_main(self) -> bool:
        """The process that writes the run folder's shared files (logs, samples, exports)."""
        return self.rank == 0

    def local(self, x):
        """This process's slice of a global batch (drawn whole on every process from one seeded stream)."""
        return rank_slice(x, self.rank, self.world_size)

    # --- updates: the trainer calls backward, then step or discard, per trained model ------------------
    @abc.abstractmethod
    def backward(self, name: str, loss: torch.Tensor):
        """Adds the gradients of `loss` to the pending ones of "generator" or "fake": one call per micro-batch of
        an update. Nothing is applied until step(name); discard(name) drops them instead."""

    @abc.abstractmethod
    def grad_norm(self, name: str):
        """Global norm of the pending gradients of `name` before clipping (over all processes): a float, or a
        0-d tensor the trainer reads together with the step's other scalars."""

    def step(self, name: str):
        """Applies the pending update of `name` (clipped); after a generator update, moves the EMA."""
        self._apply(name)
        if name == "generator":
            self.update_ema()

    @abc.abstractmethod
    def _apply(self, name: str):
        """The optimiser step of `name` on its pending gradients."""

    @abc.abstractmethod
    def discard(self, name: str):
        """Drops the pending gradients of `name` unapplied (a non-finite step)."""

    def mean_over_ranks(self, values: dict) -> dict:
        """Scalars averaged over processes (a collective with several), so every process sees the same."""
        return values

    def any_rank(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (a collective with several)."""
        return flag

    def gather(self, obj) -> list:
        """One entry per process, in rank order (a collective with several)."""
        return [obj]

    def barrier(self):
        pass

    autocast_on = False  # set by a backend when any model computes in bf16

    def autocast(self):
        """The precision context of a training step and of sampling: bf16 autocast (GPU or CPU) when any model
        is bf16 (its parameters then meet fp32 inputs), else a no-op."""
        if not self.autocast_on:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @abc.abstractmethod
    def lrs(self) -> dict:
        """Current learning rates: {"lr_generator": ..., "lr_fake": ...}."""

    def peak_memory_mib(self) -> list[float]:
        """Peak memory per process (see process_peak_mib); a collective with several."""
        return self.gather(process_peak_mib(self.device))

    @abc.abstractmethod
    def local_param_counts(self) -> dict:
        """Per model: [elements this process holds, elements of the whole model, dtype(s) it holds them in]."""

    # --- generator EMA (train.ema_decay) ------------------------------------------------------------------
    @abc.abstractmethod
    def _ema_pairs(self):
        """(shadow, source) tensor pairs: the EMA moves each shadow towards its source's current weights."""

    @torch.no_grad()
    def update_ema(self):
        if self.cfg.train.ema_decay <= 0:
            return
        w = 1 - self.cfg.train.ema_decay
        for shadow, src in self._ema_pairs():
            shadow.lerp_(src.to(shadow).view_as(shadow), w)

    # --- sampling and export ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _ema_in_use(self):
        """Context manager yielding the generator module whose weights are the EMA when it is on."""

    @contextlib.contextmanager
    def sampling(self):
        """The generator that samples and exports use: the EMA when enabled, in eval mode for the block (no
        dropout in samples; sampling draws nothing from the training RNG). With several processes every
        process enters it and calls the generator together (ZeRO-3 gathers parameters on the fly)."""
        with self._ema_in_use() as gen, eval_mode(gen):
            yield gen

    def write_generator(self, folder: Path) -> bool:
        """Writes the sampling generator as a diffusers folder (text kinds: a StableDiffusionPipeline folder
        that samples the generator's steps). Every process calls it; returns True on the one that wrote."""
        with self.sampling() as gen:
            weights = self._whole_generator_weights()
            if not self.is_main:
                return False
            gen.save_pretrained(folder, state_dict=weights)
            if self.text is not None:
                self.text.complete_pipeline(folder, gen.denoiser.schedule, gen.denoiser.prediction_type, gen.timesteps)
        return True

    def _whole_generator_weights(self) -> dict | None:
        """The denoiser network's weights when the generator module does not hold them whole (None: it does)."""
        return None

    def write_fake_score(self, folder: Path) -> bool:
        """Writes the fake score's network (without its GAN head) as a denoiser folder naming the teacher's weights
        hash, for model.init_from (engine/warmstart.py). Every process calls it; True on the one that wrote."""
        weights = self._whole_fake_weights()
        if not self.is_main:
            return False
        self.fake.save_pretrained(folder, {"teacher_hash": self.teacher_hash}, weights)
        return True

    def _whole_fake_weights(self) -> dict | None:
        return None

    # --- checkpoints ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def save_checkpoint(self, out: Path, state: dict, step: int, keep: int):
        """Writes the models' and optimisers' state with the trainer's `state` (RNG streams, step, pair position)
        so that a kill at any moment leaves the previous checkpoint whole. Every process calls it."""

    @abc.abstractmethod
    def load_checkpoint(self, out: Path) -> dict:
        """Restores the newest complete checkpoint in `out` into the models; returns the trainer state saved
        with it. DMDError when there is none."""

    # --- pairs and shutdown -------------------------------------------------------------------------------
    def whole_teacher(self):
        """(teacher, text) whole on this process's device in fp32, for making regression pairs: the pairs are
        the same bytes whichever backend, precision or entry point (engine/make_pairs.py) makes them."""
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]  # the toy's analytic teacher: buffers only
        if not self.partitioned and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
            return self.teacher, self.text
        from .kinds import load_teacher
        from .text2image import load_text
        teacher = load_teacher(self.cfg)[0].to(self.device)
        return teacher, load_text(self.cfg, teacher, self.device)

    def close(self):
        pass


def check_world(cfg, world: int):
    """Every global batch in use must split evenly over the processes (the pairs' only with the regression on)."""
    for key in ("batch_size", "reg_batch_size") if cfg.train.reg_weight > 0 else ("batch_size",):
        n = getattr(cfg.train, key)
        if n % world:
            raise DMDError(f"train.{key} = {n} is not divisible by the {world} processes")
