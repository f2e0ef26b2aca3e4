"""DeepSpeed ZeRO-3 engine for the three DMD models: the same interface as engine.builder.DMDModels, so
DMDTrainer's per-step maths runs unchanged on one process or many (`deepspeed engine/train.py ...`).

    teacher    ZeRO-3 engine, no optimiser: parameters partitioned, no gradients (bf16 on GPU)
    generator  ZeRO-3 engine with its own AdamW and LR scheduler, initialised from the teacher
    fake       ZeRO-3 engine with its own AdamW and LR scheduler, initialised from the teacher

Weights: each network is built from its config under deepspeed.zero.Init, so its parameters are partitioned
as they are created; the teacher's safetensors file is then read lazily, one tensor at a time, and copied
module by module into GatheredParameters(modifier_rank=0). No process ever holds a whole network: at most one
module's parameters are gathered at a time (and rank 0 holds that module's tensors from the file).
The exception is export: the generator's 16-bit state dict is consolidated on rank 0 (CPU) to be written.

Generator EMA: each rank keeps an fp32 copy of its own partition of every generator parameter, updated from
the optimiser's fp32 master partition after each step, so it needs no communication. Sampling and export swap
it into the partitions for the duration (`sampling()`); checkpoints store it in each rank's trainer file.

Data: every process draws the global batch's random inputs from the same seeded stream and keeps its slice
(`local`), so the union of the slices is the single-process batch and losses match it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import warnings

import torch

from models import Denoiser, OneStepGenerator, weights_hash

from .builder import TeacherShapes, eval_mode, process_peak_mib, rank_slice, resolve_path
from .cli import DMDError
from .text2image import load_text


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # otherwise DeepSpeed may pick CUDA and fail to start
    import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed's old collective names: one FutureWarning per call, every step
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    return deepspeed


def init_distributed(backend: str = "auto"):
    deepspeed = import_deepspeed()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise DMDError(f"deepspeed.backend must be auto, nccl or gloo, got '{backend}'")
    if "MASTER_PORT" not in os.environ:  # plain `python engine/train.py`: a one-process group on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if backend == "gloo":
        # DeepSpeed's CPU shared-memory all-reduce serves only inference_all_reduce, which ZeRO-3 never calls, yet
        # it JIT-builds and leaves a 69 MB /dev/shm file per rank that it never unlinks: RAM lost until reboot,
        # every run (a test suite's worth filled a 24 GiB machine). Marking the op incompatible skips it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return deepspeed


def _dtype(choice: str, key: str) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if choice not in ("fp32", "bf16"):
        raise DMDError(f"deepspeed.{key} must be auto, fp32 or bf16, got '{choice}'")
    return torch.bfloat16 if choice == "bf16" else torch.float32


def ds_config(cfg, world: int, dtype: torch.dtype, trainable: bool) -> dict:
    dc, tc = cfg.deepspeed, cfg.train
    zero = {"stage": 3, "stage3_param_persistence_threshold": dc.persistence_threshold,
            "overlap_comm": False, "contiguous_gradients": True}
    if dc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dc.offload_optimizer and trainable:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": tc.batch_size // world, "gradient_accumulation_steps": 1,
            "train_batch_size": (tc.batch_size // world) * world,
            "gradient_clipping": tc.grad_clip if trainable else 0.0,
            "zero_optimization": zero, "bf16": {"enabled": dtype == torch.bfloat16},
            # AdamW from torch (as the single-process path uses), also with offload: no compiled DeepSpeed ops
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def load_partitioned(net: torch.nn.Module, file, rank: int, deepspeed):
    """Copies a safetensors file into `net`'s partitioned parameters, one module at a time (see module doc)."""
    from safetensors import safe_open
    with safe_open(str(file), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        want = {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}
        if keys != want:
            diff = sorted(want - keys)[:3] or sorted(keys - want)[:3]
            raise DMDError(f"{file}: weights do not match the network in config.json (e.g. {', '.join(diff)})")
        for mname, mod in net.named_modules():
            prefix = f"{mname}." if mname else ""
            params = list(mod.named_parameters(recurse=False))
            if params:
                with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                    if rank == 0:
                        for n, p in params:
                            p.data.copy_(f.get_tensor(prefix + n))
            for n, b in mod.named_buffers(recurse=False):  # buffers are never partitioned: every rank loads them
                b.data.copy_(f.get_tensor(prefix + n))


class ZeroDMDModels(TeacherShapes):
    def __init__(self, cfg):
        dc, tc = cfg.deepspeed, cfg.train
        if dc.zero_stage != 3:
            raise DMDError(f"deepspeed.zero_stage must be 3 (the only stage this engine implements), got {dc.zero_stage}")
        if cfg.model.kind not in ("unet", "sd15"):
            raise DMDError(f"deepspeed.enabled needs model.kind 'unet' or 'sd15', got '{cfg.model.kind}'")
        if not cfg.model.teacher:
            raise DMDError("model.teacher is empty: set it to the teacher's diffusers folder")
        if tc.compile:  # dynamo would trace ZeRO-3's gather hooks, and the compile probe's backward would fire
            # its gradient hooks outside a real step: not supported, rather than silently wrong
            raise DMDError("train.compile is not supported with deepspeed.enabled (ZeRO-3); set it to false")
        ds = self.ds = init_distributed(dc.backend)
        from deepspeed.accelerator import get_accelerator
        self.dist = torch.distributed
        self.rank, self.world_size = self.dist.get_rank(), self.dist.get_world_size()
        for key, n in (("batch_size", tc.batch_size), ("reg_batch_size", tc.reg_batch_size)):
            if n % self.world_size:
                raise DMDError(f"train.{key} = {n} is not divisible by the {self.world_size} processes")
        self.cfg = cfg
        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0)))
                                   if torch.cuda.is_available() else "cpu")
        self.dtype, teacher_dtype = _dtype(dc.precision, "precision"), _dtype(dc.teacher_dtype, "teacher_dtype")
        self.autocast_on = torch.bfloat16 in (self.dtype, teacher_dtype)  # bf16 parameters take fp32 inputs
        folder = resolve_path(cfg.model.teacher)
        self.teacher_hash = weights_hash(folder)
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise DMDError(f"{folder}/unet holds no diffusion_pytorch_model.safetensors (needed with deepspeed)")

        # imported before zero.Init patches tensor creation, which breaks torch._dynamo imported lazily inside it
        from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: F401

        def build(dtype, trainable):
            conf = ds_config(cfg, self.world_size, dtype, trainable)
            # Built in fp32; zero.Init casts each module's parameters to conf["bf16"]'s dtype as it partitions
            # them (an explicit dtype= is ignored on CPU: DeepSpeed 0.19 then picks bf16). Each module's
            # parameters exist whole only until the end of its own __init__.
            with ds.zero.Init(config_dict_or_path=conf):
                d = Denoiser.from_pretrained(folder, torch.float32, weights=False)
            load_partitioned(d.net, weights, self.rank, ds)
            if trainable and dc.gradient_checkpointing:
                d.net.enable_gradient_checkpointing()
            d.requires_grad_(trainable).train(trainable)
            return d, conf

        teacher, conf_t = build(teacher_dtype, False)
        generator, conf_g = build(self.dtype, True)
        fake, conf_f = build(self.dtype, True)
        # text models: the prompt encoder and the decoder are frozen and small, so whole on every process
        self.text = load_text(cfg, teacher, self.device, teacher_dtype)
        generator.sample_shape = fake.sample_shape = teacher.sample_shape
        generator = OneStepGenerator(generator)
        self.engines = {"teacher": ds.initialize(model=teacher, config=conf_t)[0]}
        for name, model, conf, lr in (("generator", generator, conf_g, tc.lr_generator),
                                      ("fake", fake, conf_f, tc.lr_fake)):
            opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
            warm = dc.lr_warmup_steps
            sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
            self.engines[name] = ds.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=conf)[0]
        # The trainer calls the modules themselves: ZeRO-3's hooks live on them, so each call gathers and
        # releases the partitions like a call through the engine does.
        self.teacher, self.generator, self.fake = (self.engines[k].module for k in ("teacher", "generator", "fake"))
        # Generator EMA, partitioned like the generator: an fp32 shadow of this rank's master partition of
        # each parameter, so the EMA costs 1/world of a model per rank and no collective per step.
        self.ema_parts = None
        if tc.ema_decay > 0:
            self.ema_parts = [self._master(p).detach().float().clone() for p in self.generator.parameters()]

    # --- what DMDTrainer and engine/train.py use (same as DMDModels) ------------------------------------
    @property
    def is_main(self):
        return self.rank == 0

    @contextlib.contextmanager
    def sampling(self):
        """The generator that samples and exports use: in eval mode, with the EMA weights in its partitions
        while the block runs. Partitioned: every process must enter it and call the generator together (it
        gathers parameters on the fly)."""
        with self._ema_swapped_in(), eval_mode(self.generator) as gen:
            yield gen

    @contextlib.contextmanager
    def _ema_swapped_in(self):
        """The EMA in the generator's partitions for the block, the trained weights restored bit for bit after."""
        if self.ema_parts is None:
            yield
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
            yield
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

    @staticmethod
    def _master(p):
        """This rank's fp32 master partition of a generator parameter (its working partition when the
        optimiser keeps none)."""
        from deepspeed.utils import safe_get_local_fp32_param
        m = safe_get_local_fp32_param(p)
        return m if m is not None else p.ds_tensor

    @torch.no_grad()
    def update_ema(self):
        if self.ema_parts is None:
            return
        w = 1 - self.cfg.train.ema_decay
        for e, p in zip(self.ema_parts, self.generator.parameters()):
            e.lerp_(self._master(p).to(e).view_as(e), w)

    def load_ema_state(self, parts, source):
        if self.ema_parts is None:
            return
        if parts is None or len(parts) != len(self.ema_parts) or any(
                a.shape != b.shape for a, b in zip(parts, self.ema_parts)):
            raise DMDError(f"--resume: {source} holds no EMA of this generator's partitions "
                           f"(checkpoint written with train.ema_decay = 0, or by another process count?)")
        for e, v in zip(self.ema_parts, parts):
            e.copy_(v)

    def local(self, x):
        return rank_slice(x, self.rank, self.world_size)

    def autocast(self):
        """bf16 autocast (GPU or CPU) when any model is bf16 (its parameters then meet fp32 inputs); else a no-op."""
        if not self.autocast_on:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def backward(self, name: str, loss) -> float:
        eng = self.engines[name]
        with torch.autocast(self.device.type, enabled=False):
            eng.backward(loss)
        return self._grad_norm(eng)

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

    def step(self, name: str):
        self.engines[name].step()
        if name == "generator":
            self.update_ema()

    def discard(self, name: str):
        """Drops the pending gradients unapplied: DeepSpeed's own clean-up for an overflowing step."""
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

    def lrs(self) -> dict:
        return {f"lr_{k}": self.engines[k].get_lr()[0] for k in ("generator", "fake")}

    def barrier(self):
        self.dist.barrier()

    def peak_memory_mib(self) -> list[float]:
        """Per rank, gathered (a collective): see builder.process_peak_mib."""
        out = [None] * self.world_size
        self.dist.all_gather_object(out, process_peak_mib(self.device))
        return out

    def local_param_counts(self) -> dict:
        """Per model: (elements this rank holds, elements of the whole model, dtype(s) of the held partitions)."""
        out = {}
        for k, eng in self.engines.items():
            ps = list(eng.module.parameters())
            dtypes = ",".join(sorted({str(p.ds_tensor.dtype).removeprefix("torch.") for p in ps}))
            out[k] = (sum(p.ds_tensor.numel() for p in ps), sum(p.ds_numel for p in ps), dtypes)
        return out

    def generator_state_dict(self):
        """The generator's denoiser weights, consolidated on rank 0 (None elsewhere); all ranks must call."""
        sd = self.engines["generator"]._zero3_consolidated_16bit_state_dict()
        if sd is None:
            return None
        pre = "denoiser.net."
        return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}

    def close(self):
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()
