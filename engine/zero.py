"""The DeepSpeed ZeRO-3 backend (engine/backend.py's interface), on one process or many
(`deepspeed engine/train.py ...`):

    teacher    ZeRO-3 engine, no optimiser: parameters partitioned, no gradients (bf16 on GPU)
    generator  ZeRO-3 engine with its own AdamW and LR scheduler, initialised from the teacher (or model.init_from)
    fake       ZeRO-3 engine with its own AdamW and LR scheduler, initialised from the teacher (or model.init_from)

Weights: each network is built under deepspeed.zero.Init (partitioned as created), then the teacher's file (or
model.init_from's export) is copied in one module at a time (engine/distributed.py): no process holds a whole
network, except rank 0 consolidating the generator's and the fake score's 16-bit weights for their exports.

Generator EMA: each rank keeps an fp32 copy of its own partition of every generator parameter, moved towards
the optimiser's fp32 master partition after each step (no communication); sampling swaps it in.

Checkpoints: OUT/checkpoints/<tag>/ with tag = step_NNNNNN, holding generator/ and fake/ (DeepSpeed's own:
partitioned weights, optimiser and LR-scheduler state), trainer_rank<r>.pt (the trainer's state, this rank's
EMA partitions) and checksums_rank<r>.json (size and sha256 of this rank's files), and OUT/checkpoints/latest
naming the newest complete tag (engine/tags.py). Every rank writes its parts, barrier, then rank 0 replaces
`latest` and prunes all but the newest keep_checkpoints tags. A resume loads the newest tag whose files match
their checksums, reading DeepSpeed's files as tensors only.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import torch

from models import Denoiser, weights_hash

from .backend import Backend, adamw, attach_gan_head, check_world, dtype_choice, set_dropout, warmup_scheduler
from .distributed import ds_config, init_distributed, load_partitioned, tensors_only
from .errors import DMDError
from .faults import kill_hook
from .files import load_tensors, write_digests
from .kinds import generator_of, model_kind, teacher_folder
from .tags import intact_tag, latest_tag, publish
from .text2image import load_text
from .warmstart import init_files

class ZeroBackend(Backend):
    partitioned = True
    name = "deepspeed-zero3"

    def __init__(self, cfg, init_from: str | None = None):
        """init_from: a run whose generator and fake score this run starts from (engine/warmstart.py)."""
        dc = cfg.deepspeed
        if dc.zero_stage != 3:
            raise DMDError(f"deepspeed.zero_stage must be 3 (the only stage this engine implements), got {dc.zero_stage}")
        if not model_kind(cfg.model.kind).folder:
            raise DMDError(f"deepspeed.enabled needs a teacher folder (model.kind unet or sd15), got '{cfg.model.kind}'")
        if not cfg.model.teacher:
            raise DMDError("model.teacher is empty: set it to the teacher's diffusers folder")
        if cfg.train.compile:  # dynamo would trace ZeRO-3's gather hooks, and the compile probe's backward would
            # fire its gradient hooks outside a real step: not supported, rather than silently wrong
            raise DMDError("train.compile is not supported with deepspeed.enabled (ZeRO-3); set it to false")
        self.ds = init_distributed(dc.backend)
        from deepspeed.accelerator import get_accelerator
        self.dist = torch.distributed
        self.rank, self.world_size = self.dist.get_rank(), self.dist.get_world_size()
        check_world(cfg, self.world_size)
        self.cfg, self.kind = cfg, model_kind(cfg.model.kind)
        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0)))
                                   if torch.cuda.is_available() else "cpu")
        self.dtype = dtype_choice(dc.precision, "precision", self.device)
        self.teacher_dtype = dtype_choice(dc.teacher_dtype, "teacher_dtype", self.device)
        self.autocast_on = torch.bfloat16 in (self.dtype, self.teacher_dtype)  # bf16 parameters meet fp32 inputs
        self.folder = teacher_folder(cfg)
        self.teacher_hash = weights_hash(self.folder)
        self.weights = self.folder / "unet" / "diffusion_pytorch_model.safetensors"
        if not self.weights.is_file():
            raise DMDError(f"{self.folder}/unet holds no diffusion_pytorch_model.safetensors (needed with deepspeed)")
        self.init = init_files(init_from, self.teacher_hash)  # (generator, fake score) weights, or None
        # imported before zero.Init patches tensor creation, which breaks torch._dynamo imported lazily inside it
        from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: F401

        self.engines = {"teacher": self._build_teacher()}
        self.teacher = self.engines["teacher"].module
        self.kind.check(cfg, self.teacher)
        # text models: the prompt encoder and the decoder are frozen and small, so whole on every process
        self.text = load_text(cfg, self.teacher, self.device, self.teacher_dtype)
        self.engines["generator"] = self._build_trained("generator", cfg.train.lr_generator)
        self.engines["fake"] = self._build_trained("fake", cfg.train.lr_fake)
        # The trainer calls the modules themselves: ZeRO-3's hooks live on them, so each call gathers and
        # releases the partitions as a call through the engine does.
        self.generator, self.fake = self.engines["generator"].module, self.engines["fake"].module
        set_dropout(cfg.train.dropout, self.generator, self.fake)
        # Generator EMA, partitioned like the generator: an fp32 shadow of this rank's master partition of
        # each parameter, so the EMA costs 1/world of a model per rank and no collective per step.
        self.ema_parts = None
        if cfg.train.ema_decay > 0:
            self.ema_parts = [self._master(p).detach().float().clone() for p in self.generator.parameters()]

    # --- the three models -----------------------------------------------------------------------------------
    def _partitioned_denoiser(self, conf: dict, trainable: bool, weights: Path | None = None) -> Denoiser:
        # Built in fp32; zero.Init casts each module's parameters to conf["bf16"]'s dtype as it partitions
        # them (an explicit dtype= is ignored on CPU: DeepSpeed 0.19 then picks bf16). Each module's
        # parameters exist whole only until the end of its own __init__.
        with self.ds.zero.Init(config_dict_or_path=conf):
            d = Denoiser.from_pretrained(self.folder, torch.float32, weights=False)
        load_partitioned(d.net, weights or self.weights, self.rank, self.ds)
        if trainable and self.cfg.deepspeed.gradient_checkpointing:
            d.net.enable_gradient_checkpointing()
        return d.requires_grad_(trainable).train(trainable)

    def _build_teacher(self):
        conf = ds_config(self.cfg, self.world_size, self.teacher_dtype, False)
        return self.ds.initialize(model=self._partitioned_denoiser(conf, False), config=conf)[0]

    def _build_trained(self, name: str, lr: float):
        """The generator or the fake score: a partitioned copy of the teacher with its own AdamW and scheduler."""
        conf = ds_config(self.cfg, self.world_size, self.dtype, True)
        d = self._partitioned_denoiser(conf, True, self.init[1 if name == "fake" else 0] if self.init else None)
        d.sample_shape = self.teacher.sample_shape  # text kinds: the latent shape load_text set
        if name == "fake":
            # whole here; DeepSpeed partitions it at initialize. No early exit: ZeRO-3's hooks gather and release
            # each submodule's weights around its forward and replay a recorded module order, which a forward
            # cut short at the mid block would leave gathered and out of order.
            attach_gan_head(d, self.cfg, early_exit=False)
        model = generator_of(d, self.cfg) if name == "generator" else d
        opt = adamw(model.parameters(), lr, self.cfg.train)
        sched = lambda o: warmup_scheduler(o, self.cfg.deepspeed.lr_warmup_steps)
        return tensors_only(self.ds.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=conf)[0])

    # --- updates --------------------------------------------------------------------------------------------
    def backward(self, name: str, loss):
        eng = self.engines[name]
        # ZeRO-3 adds each backward's gradient partitions to the pending ones once its micro-step counter has
        # moved on; engine.forward moves it, but the trainer calls the modules directly, so it is moved here.
        # After step() or discard() the counter is back at 0: the first micro-batch overwrites.
        eng.optimizer.clear_backward_seen_flag()
        with torch.autocast(self.device.type, enabled=False):
            eng.backward(loss, scale_wrt_gas=False)  # the trainer weights each micro-batch by its share

    def grad_norm(self, name: str) -> float:
        return self._grad_norm(self.engines[name])

    def _grad_norm(self, eng) -> float:
        """Global norm of the (averaged, not yet clipped) gradients: each rank's partitions, summed over ranks."""
        from deepspeed.utils import safe_get_local_grad
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in eng.module.parameters():
            if p.requires_grad:
                g = safe_get_local_grad(p)
                if g is not None:
                    sq += g.double().square().sum()
        self.dist.all_reduce(sq)
        v = sq.item()
        return math.sqrt(v) if math.isfinite(v) else float("nan")

    def _apply(self, name: str):
        self.engines[name].step()

    def discard(self, name: str):
        """DeepSpeed's own clean-up for an overflowing step."""
        opt = self.engines[name].optimizer
        if hasattr(opt, "_overflow_clean_up"):
            opt._overflow_clean_up(getattr(opt, "loss_scale", 1.0))
        else:
            opt.zero_grad(set_to_none=True)

    def mean_over_ranks(self, values: dict) -> dict:
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        self.dist.barrier()

    def lrs(self) -> dict:
        return {f"lr_{k}": self.engines[k].get_lr()[0] for k in ("generator", "fake")}

    def local_param_counts(self) -> dict:
        out = {}
        for k, eng in self.engines.items():
            ps = list(eng.module.parameters())
            dtypes = ",".join(sorted({str(p.ds_tensor.dtype).removeprefix("torch.") for p in ps}))
            out[k] = [sum(p.ds_tensor.numel() for p in ps), sum(p.ds_numel for p in ps), dtypes]
        return out

    # --- EMA, sampling, export ------------------------------------------------------------------------------
    @staticmethod
    def _master(p):
        """This rank's fp32 master partition of a generator parameter (its working partition when the
        optimiser keeps none)."""
        from deepspeed.utils import safe_get_local_fp32_param
        m = safe_get_local_fp32_param(p)
        return m if m is not None else p.ds_tensor

    def _ema_pairs(self):
        return ((e, self._master(p)) for e, p in zip(self.ema_parts, self.generator.parameters()))

    @contextlib.contextmanager
    def _ema_in_use(self):
        """The EMA in the generator's partitions for the block, the trained weights restored bit for bit after."""
        if self.ema_parts is None:
            yield self.generator
            return
        params = list(self.generator.parameters())
        # A parameter may also be whole at the moment (persistent ones, under deepspeed.persistence_threshold
        # elements, always are), and ZeRO-3 will not re-gather it from its partition: swap it whole too. Which
        # parameters are whole is the same on every rank, so the gathers in _whole line up.
        saved = [p.ds_tensor.detach().clone() for p in params]
        saved_whole = {i: p.data.detach().clone() for i, p in enumerate(params) if self._is_whole(p)}
        try:
            with torch.no_grad():
                for i, (p, e) in enumerate(zip(params, self.ema_parts)):
                    p.ds_tensor.copy_(e.view_as(p.ds_tensor))
                    if i in saved_whole:
                        p.data.copy_(self._whole(p, e))
            yield self.generator
        finally:
            with torch.no_grad():
                for i, (p, s) in enumerate(zip(params, saved)):
                    p.ds_tensor.copy_(s)
                    if self._is_whole(p):  # whole before, or gathered (from the EMA) inside the block
                        p.data.copy_(saved_whole[i] if i in saved_whole else self._whole(p, s))

    @staticmethod
    def _is_whole(p) -> bool:
        return p.ds_numel > 0 and p.data.numel() == p.ds_numel

    def _whole(self, p, part):
        """A parameter's whole tensor from every rank's partition of it (a collective)."""
        parts = [torch.empty_like(part) for _ in range(self.world_size)]
        self.dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape)

    def _whole_generator_weights(self):
        """The generator's denoiser weights, consolidated on rank 0 (None elsewhere); all ranks must call."""
        sd = self.engines["generator"]._zero3_consolidated_16bit_state_dict()
        if sd is None:
            return None
        pre = "denoiser.net."
        return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}

    def _whole_fake_weights(self):
        sd = self.engines["fake"]._zero3_consolidated_16bit_state_dict()  # its GAN head left out below
        return None if sd is None else {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}

    # --- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, out: Path, state: dict, step: int, keep: int):
        root = out / "checkpoints"
        tag = f"step_{step:06d}"
        folder = root / tag
        if latest_tag(root) == tag and (folder / f"checksums_rank{self.rank}.json").is_file():
            return  # this step is saved and published already (a resume with nothing to train): never rewrite it
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)  # a partial folder of a killed save at this step
        self.barrier()
        for name in ("generator", "fake"):
            self.engines[name].save_checkpoint(str(folder), tag=name, save_latest=False)
        kill_hook("DMD_TEST_KILL_IN_SAVE", step)
        tmp = folder / f".trainer_rank{self.rank}.pt.tmp"
        torch.save({**state, "ema": self.ema_parts}, tmp)  # EMA: this rank's partitions
        os.replace(tmp, folder / f"trainer_rank{self.rank}.pt")
        # DeepSpeed names the bf16 optimiser's files bf16_zero_pp_rank_<r>_...: the pattern takes both
        mine = [*folder.glob(f"*/*zero_pp_rank_{self.rank}_mp_rank_*"), folder / f"trainer_rank{self.rank}.pt"]
        write_digests(folder, mine, f"checksums_rank{self.rank}.json")
        self.barrier()  # every rank's part is on disk before `latest` may name the tag
        if self.is_main:
            publish(root, step, keep)
        self.barrier()

    def load_checkpoint(self, out: Path) -> dict:
        root = out / "checkpoints"
        folder = root / intact_tag(root, self.is_main)
        state = folder / f"trainer_rank{self.rank}.pt"
        if not state.is_file():
            raise DMDError(f"--resume: {state} is missing (checkpoint written by a run with another process "
                           f"count? resume with the same number of processes)")
        for name in ("generator", "fake"):
            path, _ = self.engines[name].load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
            if path is None:
                raise DMDError(f"--resume: DeepSpeed could not load {folder / name}")
        s = load_tensors(state, "cpu")  # the RNG states must stay CPU tensors; the EMA is copied to its device
        self._load_ema(s.pop("ema", None), state)
        return s

    def _load_ema(self, parts, source):
        if self.ema_parts is None:
            return
        if parts is None or len(parts) != len(self.ema_parts) or any(
                a.shape != b.shape for a, b in zip(parts, self.ema_parts)):
            raise DMDError(f"--resume: {source} holds no EMA of this generator's partitions "
                           f"(checkpoint written with train.ema_decay = 0, or by another process count?)")
        with torch.no_grad():
            for e, v in zip(self.ema_parts, parts):
                e.copy_(v)

    def close(self):
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()
