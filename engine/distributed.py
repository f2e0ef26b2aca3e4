"""DeepSpeed set-up for the ZeRO-3 backend (engine/zero.py): the process group, the per-model DeepSpeed config,
and copying a teacher's safetensors file into partitioned parameters one module at a time."""
from __future__ import annotations

import logging
import os
import socket
import warnings

import torch

from .errors import DMDError
from .files import load_tensors


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
            # micro-batches' gradients are summed into the partitions in this dtype (DeepSpeed's default: the
            # compute dtype, which would add bf16 rounding per micro-batch)
            "data_types": {"grad_accum_dtype": "fp32"},
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


def tensors_only(engine):
    """Makes a DeepSpeed engine read its checkpoint files as tensors only. DeepSpeed's own reader calls
    torch.load(weights_only=False), which runs whatever code a crafted file holds; this one is
    files.load_tensors (weights_only=True), allowing just the DeepSpeed classes ZeRO-3's optimiser state holds."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum]

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return load_tensors(path, map_location)

    engine.checkpoint_engine.load = load
    return engine
