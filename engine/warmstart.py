"""model.init_from: a new run whose generator and fake score start from another run's networks, not the teacher's.

DMD2's SD1.5 recipe trains in two phases: without the GAN at lr 1e-5, then with it at 5e-7 from the first phase's
generator and fake score (configs/sd15_dmd2_zero3.json, then configs/sd15_dmd2_gan_zero3.json). Taken from RUN:
    RUN/generator/    the exported generator (its EMA when RUN kept one)
    RUN/fake_score/   the fake score's network, written beside the generator at every checkpoint (not its GAN head)
Started afresh: optimisers, step count, LR warm-up, the EMA (a copy of the loaded generator), the GAN head, the
pair and real-data positions. Both are whole safetensors files, so either backend at any process count starts
from a run of either backend. Each export names the save it belongs to: a pair from two saves is refused. ZeRO-3
on a GPU exports bf16, so there the new fp32 masters start from bf16-rounded weights (what RUN's forward used).
A --resume reads its own checkpoint instead and does not need RUN any more.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import DMDError
from .files import resolve_path

FAKE_SCORE = "fake_score"  # the run folder's fake-score export
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def stamp(folder: Path, step: int):
    """Records in an export's dmd_model.json which save it belongs to, so that a generator and a fake score from
    different saves (a kill between the two exports) are not taken as a pair."""
    meta = folder / "dmd_model.json"
    if meta.is_file():
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": step}, indent=2))


def _meta(run: Path, part: str) -> dict:
    path = run / part / "dmd_model.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DMDError(f"model.init_from: {path} cannot be read ({type(e).__name__})") from None


def init_files(init_from: str | None, teacher_hash: str | None = None) -> tuple[Path, Path] | None:
    """(generator weights, fake-score weights) of the run `init_from`, from one save and, when teacher_hash is
    given, from this teacher; None when there is no run to start from."""
    if not init_from:
        return None
    run = resolve_path(init_from)
    if not run.is_dir():
        raise DMDError(f"model.init_from: run folder '{init_from}' not found")
    files = run / "generator" / WEIGHTS, run / FAKE_SCORE / WEIGHTS
    for f in files:
        if not f.is_file():
            raise DMDError(f"model.init_from: {f} is missing (a run writes generator/ and {FAKE_SCORE}/ with each "
                           f"checkpoint; for a run that has saved but has no {FAKE_SCORE}/ yet, --resume it once: its "
                           f"final save writes both)")
    gen, fake = _meta(run, "generator"), _meta(run, FAKE_SCORE)
    if gen.get("step") != fake.get("step"):
        raise DMDError(f"model.init_from: {run}/generator is from step {gen.get('step')} but {FAKE_SCORE}/ from step "
                       f"{fake.get('step')} (a save was cut short; --resume that run once to finish it)")
    if teacher_hash is not None and fake.get("teacher_hash") != teacher_hash:
        theirs = str(fake.get("teacher_hash"))[:12]
        raise DMDError(f"model.init_from: {run} was not trained from this teacher ({FAKE_SCORE}/dmd_model.json "
                       f"names weights hash {theirs}, model.teacher has {teacher_hash[:12]})")
    return files


def load_whole(net: torch.nn.Module, file: Path):
    """Copies a whole safetensors file into `net` (the one-process backend), cast to the net's dtype."""
    from safetensors.torch import load_file
    weights = load_file(str(file))
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DMDError(f"model.init_from: {file} does not fit the teacher's network "
                       f"({' '.join(s.strip() for s in first[:2])[:200]})") from None
