"""Checkpoints that survive faults, and the generator and fake-score exports; the storage belongs to the backend.

    save(out, models, trainer, sampler, extra)   the backend's checkpoint (engine/plain.py: OUT/checkpoint/,
                                                 engine/zero.py: OUT/checkpoints/<tag>/), then the exports
    load(out, models, trainer, sampler)          the newest complete checkpoint, models and trainer state
    export_generator(out, models, step)          OUT/generator/: written beside it and swapped in, so it is
                                                 always a whole diffusers folder
    export_fake_score(out, models, step)         OUT/fake_score/ the same way, for model.init_from
                                                 (engine/warmstart.py); both name the save's step

What a checkpoint holds besides the models: the trainer's state (engine/trainer.py: the shared noise stream,
this process's torch RNG, step, skip counts) and the pair and real-data samplers' positions, so a resumed run continues
draw for draw.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .files import swap_in
from .warmstart import FAKE_SCORE, stamp


def _export(out: Path, name: str, models, write, step: int):
    tmp = out / f".{name}.partial"
    if models.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if write(tmp):  # a collective with several processes; True where it was written
        stamp(tmp, step)
        swap_in(tmp, out / name)


def export_generator(out: Path, models, step: int):
    """OUT/generator/: weights in the training parameter dtype (bf16 with DeepSpeed on GPU, else fp32)."""
    _export(out, "generator", models, models.write_generator, step)


def export_fake_score(out: Path, models, step: int):
    """OUT/fake_score/ (UNet teachers; the toy's fake score is not carried over), in the same dtype."""
    if models.kind.folder:
        _export(out, FAKE_SCORE, models, models.write_fake_score, step)


def save(out: Path, models, trainer, sampler, extra: dict | None = None, keep: int = 2, real_sampler=None):
    """real_sampler: the GAN's real-data batch sampler, whose position is saved like the pairs sampler's."""
    state = {**trainer.state_dict(), "sampler": sampler.state_dict() if sampler else None,
             "real_sampler": real_sampler.state_dict() if real_sampler else None, **(extra or {})}
    models.save_checkpoint(out, state, trainer.step, keep)
    export_generator(out, models, trainer.step)
    export_fake_score(out, models, trainer.step)


def load(out: Path, models, trainer, sampler, real_sampler=None) -> dict:
    """Restores models, trainer and the samplers' positions; returns the saved state (extras included)."""
    s = models.load_checkpoint(out)
    trainer.load_state_dict(s)
    if sampler and s.get("sampler"):
        sampler.load_state_dict(s["sampler"])
    if real_sampler and s.get("real_sampler"):
        real_sampler.load_state_dict(s["real_sampler"])
    return s
