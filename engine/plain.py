"""The one-process backend: plain PyTorch, the three models whole on one device (train.device).

Checkpoint: OUT/checkpoint/state.pt (models, optimisers, EMA and the trainer's state), the folder replaced
atomically: written beside it, then swapped in (engine/files.py), so a kill leaves a whole one.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path

import torch

from .backend import Backend, adamw, attach_gan_head, dtype_choice, set_dropout, warmup_scheduler
from .errors import DMDError
from .files import damaged, load_tensors, recover_swapped, swap_in, write_digests
from .kinds import load_teacher, model_kind
from .devices import pick_device
from .text2image import load_text
from .warmstart import init_files, load_whole


def resolve_device(choice: str) -> torch.device:
    """train.device: auto = the first CUDA device when there is one, else the CPU."""
    return pick_device(choice, "train.device")


class PlainBackend(Backend):
    name = "plain"

    def __init__(self, cfg, device="cpu", teacher: tuple | None = None, init_from: str | None = None):
        """teacher: (Denoiser, hash) built by the caller instead of loaded from cfg.model (benchmarks). init_from:
        a run whose generator and fake score this run starts from (engine/warmstart.py)."""
        tc = cfg.train
        self.cfg, self.device, self.kind = cfg, torch.device(device), model_kind(cfg.model.kind)
        dc = cfg.deepspeed  # the precision switches are shared with the ZeRO-3 backend
        self.dtype = dtype_choice(dc.precision, "precision", self.device)
        self.teacher_dtype = dtype_choice(dc.teacher_dtype, "teacher_dtype", self.device)
        self.autocast_on = torch.bfloat16 in (self.dtype, self.teacher_dtype)
        self.teacher, self.teacher_hash = teacher or load_teacher(cfg)
        self.teacher.to(self.device).eval().requires_grad_(False)
        # before the copies: they share its null condition
        self.text = load_text(cfg, self.teacher, self.device, self.teacher_dtype)
        # the copies are made from the fp32 teacher: their weights are the fp32 masters, bf16 only under autocast
        self.generator, self.fake = self.kind.trainables(cfg, self.teacher)
        files = init_files(init_from, self.teacher_hash)
        if files:  # before the EMA copy and the GAN head: the EMA starts from these weights, the head afresh
            load_whole(self.generator.denoiser.net, files[0])
            load_whole(self.fake.net, files[1])
        self.generator.to(self.device, torch.float32).train().requires_grad_(True)
        self.fake.to(self.device, torch.float32).train().requires_grad_(True)
        set_dropout(tc.dropout, self.generator, self.fake)
        attach_gan_head(self.fake, cfg, early_exit=True)  # part of the fake score: its optimiser, its checkpoint
        self.teacher.to(self.teacher_dtype)
        self.opt = {"generator": adamw(self.generator.parameters(), tc.lr_generator, tc),
                    "fake": adamw(self.fake.parameters(), tc.lr_fake, tc)}
        self.sched = {k: warmup_scheduler(o, dc.lr_warmup_steps) for k, o in self.opt.items()}
        self.ema = copy.deepcopy(self.generator).requires_grad_(False).eval() if tc.ema_decay > 0 else None
        self._pending: set[str] = set()  # models with gradients accumulated for the update in progress
        self._norms: dict = {}  # each pending update's gradient norm, from grad_norm

    def _model(self, name: str):
        return self.generator if name == "generator" else self.fake

    def backward(self, name: str, loss):
        if name not in self._pending:  # the first micro-batch of an update starts from no gradients
            self.opt[name].zero_grad(set_to_none=True)
            self._pending.add(name)
        self._norms.pop(name, None)  # new gradients: a norm taken before them is stale
        loss.backward()

    def _grads(self, name: str):
        return [p for p in self._model(name).parameters() if p.grad is not None]

    def grad_norm(self, name: str):
        params = self._grads(name)  # a device tensor: the trainer reads all of a step's scalars at once
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self._norms[name] = norm  # _apply clips with it instead of computing it again
        return norm

    def _apply(self, name: str):
        params = self._grads(name)
        if self.cfg.train.grad_clip > 0 and params:
            norm = self._norms.pop(name, None)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if norm is None else norm
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.grad_clip, norm)
        self.opt[name].step()
        self.sched[name].step()
        self._pending.discard(name)

    def discard(self, name: str):
        self.opt[name].zero_grad(set_to_none=True)
        self._pending.discard(name)
        self._norms.pop(name, None)

    def lrs(self) -> dict:
        return {f"lr_{k}": o.param_groups[0]["lr"] for k, o in self.opt.items()}

    def local_param_counts(self) -> dict:
        out = {}
        for k, m in (("teacher", self.teacher), ("generator", self.generator), ("fake", self.fake)):
            ps = list(m.parameters())
            n = sum(p.numel() for p in ps)
            out[k] = [n, n, ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in ps}))]
        return out

    def _ema_pairs(self):
        return zip(self.ema.parameters(), self.generator.parameters())

    @contextlib.contextmanager
    def _ema_in_use(self):
        yield self.ema if self.ema is not None else self.generator

    # --- checkpoints ----------------------------------------------------------------------------------------
    def _state_dict(self) -> dict:
        s = {"generator": self.generator.state_dict(), "fake": self.fake.state_dict(),
             "opt_g": self.opt["generator"].state_dict(), "opt_f": self.opt["fake"].state_dict(),
             "sched_g": self.sched["generator"].state_dict(), "sched_f": self.sched["fake"].state_dict()}
        if self.ema is not None:
            s["ema"] = self.ema.state_dict()
        return s

    def _load_state_dict(self, s: dict):
        self.generator.load_state_dict(s["generator"])
        self.fake.load_state_dict(s["fake"])
        self.opt["generator"].load_state_dict(s["opt_g"])
        self.opt["fake"].load_state_dict(s["opt_f"])
        if "sched_g" in s:  # checkpoints from before the one-process warm-up have none (constant LR)
            self.sched["generator"].load_state_dict(s["sched_g"])
            self.sched["fake"].load_state_dict(s["sched_f"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])

    def save_checkpoint(self, out: Path, state: dict, step: int, keep: int):
        tmp = out / ".checkpoint.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save({"models": self._state_dict(), **state}, tmp / "state.pt")
        write_digests(tmp, [tmp / "state.pt"])
        swap_in(tmp, out / "checkpoint")

    def load_checkpoint(self, out: Path) -> dict:
        recover_swapped(out / "checkpoint")
        path = out / "checkpoint" / "state.pt"
        if not path.is_file():
            raise DMDError(f"--resume: no checkpoint at {path}")
        problem = damaged(path.parent)
        if problem:
            raise DMDError(f"--resume: the checkpoint in {path.parent} is damaged ({problem}) and a one-process run "
                           f"keeps no older one")
        s = load_tensors(path, "cpu")  # the RNG states must stay CPU tensors; load_state_dict moves the rest
        self._load_state_dict(s.pop("models"))
        return s
