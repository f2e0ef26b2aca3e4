"""Checkpoints that survive faults, and the generator export.

Single process (engine.builder.DMDModels): OUT/checkpoint/state.pt, the folder replaced atomically.

DeepSpeed (engine.zero.ZeroDMDModels): OUT/checkpoints/<tag>/ with tag = step_NNNNNN, holding
    generator/, fake/        DeepSpeed checkpoints: partitioned weights, optimiser and LR-scheduler state
    trainer_rank<r>.pt       step, the shared noise stream, this rank's torch RNG, pair-sampler position, skips
and OUT/checkpoints/latest naming the newest complete tag. Order: every rank writes the tag folder, barrier,
then rank 0 replaces `latest` by rename, then prunes all but the newest keep_checkpoints tags. A run killed
while saving leaves `latest` naming the previous tag, which is untouched; the partial folder is removed by
the next save.

The generator is exported to OUT/generator/ (a diffusers folder) after each checkpoint: written beside it
and renamed, so OUT/generator/ is always a whole model.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import torch

from . import cli

TAG = re.compile(r"^step_(\d{6,})$")


def _swap_in(tmp: Path, final: Path):
    """Replaces folder `final` by the complete folder `tmp`; the old one is deleted only after the rename, so a
    kill at any point leaves a whole folder at `final` or at `final` + '.old'."""
    old = final.with_name("." + final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def kill_hook(var: str, step: int):
    """Test hook: SIGKILL this process when the environment variable `var` names this step."""
    if os.environ.get(var) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _trainer_state(trainer, sampler) -> dict:
    return {"rng": trainer.rng.get_state(), "torch_rng": torch.get_rng_state(), "step": trainer.step,
            "sampler": sampler.state_dict() if sampler else None,
            "skipped_total": trainer.skipped_total, "skips_in_row": trainer.skips_in_row}


def _restore_trainer(s: dict, trainer, sampler):
    trainer.rng.set_state(s["rng"])
    torch.set_rng_state(s["torch_rng"])
    trainer.step = s["step"]
    trainer.skipped_total, trainer.skips_in_row = s.get("skipped_total", 0), s.get("skips_in_row", 0)
    if sampler and s.get("sampler"):
        sampler.load_state_dict(s["sampler"])


def export_generator(out: Path, models):
    """OUT/generator/: weights in the training parameter dtype (bf16 with DeepSpeed on GPU, else fp32)."""
    with models.sampling() as gen:  # the EMA when enabled
        sd = models.generator_state_dict()  # ZeRO-3: a collective, every rank takes part
        if not models.is_main:
            return
        tmp = out / ".generator.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        gen.save_pretrained(tmp, state_dict=sd)
        if models.text is not None:  # text models: a StableDiffusionPipeline folder that samples in one step
            models.text.complete_pipeline(tmp, gen.denoiser.schedule, gen.denoiser.prediction_type)
    _swap_in(tmp, out / "generator")


def save(out: Path, models, trainer, sampler, extra: dict, keep: int = 2):
    if hasattr(models, "engines"):
        _save_zero(out, models, trainer, sampler, keep)
    else:
        _save_plain(out, models, trainer, sampler, extra)
    export_generator(out, models)


def load(out: Path, models, trainer, sampler):
    if hasattr(models, "engines"):
        return _load_zero(out, models, trainer, sampler)
    old = out / ".checkpoint.old"
    if not (out / "checkpoint").exists() and old.is_dir():  # killed between the two renames of _swap_in
        old.rename(out / "checkpoint")
    path = out / "checkpoint" / "state.pt"
    if not path.is_file():
        raise cli.DMDError(f"--resume: no checkpoint at {path}")
    s = torch.load(path, map_location=models.device, weights_only=True)
    models.load_state_dict(s["models"])
    _restore_trainer(s, trainer, sampler)


def _save_plain(out: Path, models, trainer, sampler, extra: dict):
    """checkpoint/ is replaced atomically: written beside it, then renamed; the old one goes last."""
    tmp = out / ".checkpoint.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"models": models.state_dict(), **_trainer_state(trainer, sampler), **extra}, tmp / "state.pt")
    _swap_in(tmp, out / "checkpoint")


def _tags(root: Path) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), d.name) for d in root.iterdir() if d.is_dir() and (m := TAG.match(d.name)))


def latest_tag(root: Path) -> str | None:
    f = root / "latest"
    return f.read_text().strip() if f.is_file() else None


def _save_zero(out: Path, models, trainer, sampler, keep: int):
    root = out / "checkpoints"
    tag = f"step_{trainer.step:06d}"
    folder = root / tag
    if models.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)  # a partial folder of a killed save at this step
    models.barrier()
    for name in ("generator", "fake"):
        models.engines[name].save_checkpoint(str(folder), tag=name, save_latest=False)
    kill_hook("DMD_TEST_KILL_IN_SAVE", trainer.step)
    tmp = folder / f".trainer_rank{models.rank}.pt.tmp"
    torch.save({**_trainer_state(trainer, sampler), "ema": models.ema_parts}, tmp)  # EMA: this rank's partitions
    os.replace(tmp, folder / f"trainer_rank{models.rank}.pt")
    models.barrier()  # every rank's part is on disk before `latest` may name the tag
    if models.is_main:
        cli.atomic_write_text(root / "latest", tag + "\n")
        done = [t for s, t in _tags(root) if s <= trainer.step]
        for s, t in _tags(root):
            if s > trainer.step or t in done[:-max(keep, 1)]:  # leftovers of killed saves, and old tags
                shutil.rmtree(root / t, ignore_errors=True)
    models.barrier()


def _load_zero(out: Path, models, trainer, sampler):
    root = out / "checkpoints"
    tag = latest_tag(root) if root.is_dir() else None
    if tag is None:
        raise cli.DMDError(f"--resume: no complete checkpoint in {root} (no 'latest' file)")
    folder = root / tag
    state = folder / f"trainer_rank{models.rank}.pt"
    if not state.is_file():
        raise cli.DMDError(f"--resume: {state} is missing (checkpoint written by a run with another process "
                           f"count? resume with the same number of processes)")
    for name in ("generator", "fake"):
        path, _ = models.engines[name].load_checkpoint(str(folder), tag=name, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        if path is None:
            raise cli.DMDError(f"--resume: DeepSpeed could not load {folder / name}")
    s = torch.load(state, map_location=models.device, weights_only=True)
    models.load_ema_state(s.get("ema"), state)
    _restore_trainer(s, trainer, sampler)
    return tag
