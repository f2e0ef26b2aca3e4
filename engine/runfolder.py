"""A run folder is written only by its own run.

    fresh run     OUT must be new, empty, or hold only pairs/ (made by engine/make_pairs.py; checked against the
                  teacher and config when read). Anything else is refused in one line, unless --overwrite, which
                  removes OUT's content as a whole (pairs/ is kept: it is verified before use) before anything is
                  written. The run writes config.json only once its pairs are ready, so a run refused before
                  training leaves nothing behind but pairs.
    --resume      OUT must hold a run (config.json). The new config may differ from the run's only in keys that do
                  not change what is trained (RESUMABLE); any other difference is refused, naming the keys. The
                  changes are written to log.jsonl, and config.json is replaced only once the checkpoint has loaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import DMDError

KEEP = {"pairs", "plan.json"}  # what a fresh run may find in OUT: make_pairs.py and --dry-run write them
RESUMABLE = {"name", "train.max_steps", "train.log_every", "train.sample_every", "train.save_every", "train.threads",
             "train.max_consecutive_skips", "data.loader", "deepspeed.keep_checkpoints",
             "model.init_from"}  # read by a fresh run only: a resume takes its weights from its own checkpoint
RESUMABLE_SECTIONS = {"eval"}
# Keys added to the engine after runs were written, whose default is what the engines before them did: a run's
# config.json without one reads as that default, so the older runs still resume.
ADDED_AT_DEFAULT = {"train.gan_real_dequantize": 0.0}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _listed(items: list[str], n: int = 5, sep: str = ", ") -> str:
    return sep.join(items[:n]) + (f"{sep}..." if len(items) > n else "")


def config_changes(old: dict, new: dict) -> tuple[dict, list[str]]:
    """({key: [old, new]} allowed on resume, [keys that may not change])."""
    a, b = _flat(old), _flat(new)
    a.update({k: v for k, v in ADDED_AT_DEFAULT.items() if k not in a and k in b})
    changed = {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    bad = [k for k in changed if k not in RESUMABLE and k.split(".")[0] not in RESUMABLE_SECTIONS]
    return changed, bad


def check(out: Path, resume: bool, overwrite: bool, cfg_dict: dict) -> dict:
    """Validates OUT for this run before any work (and makes it, empty, for a fresh run). Returns the allowed
    config changes on resume."""
    if resume and overwrite:
        raise DMDError("--resume and --overwrite contradict each other: give one")
    if out.exists() and not out.is_dir():
        raise DMDError(f"--out '{out}' is a file, not a folder")
    if resume:
        saved = out / "config.json"
        if not saved.is_file():
            raise DMDError(f"--resume: '{out}' holds no run (no config.json)")
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError:
            raise DMDError(f"--resume: {saved} is not valid JSON") from None
        changed, bad = config_changes(old, cfg_dict)
        if bad:
            saved_keys = _flat(old)
            older = [k for k in bad if k not in saved_keys]  # keys this engine has and the run's engine had not
            if older and len(older) == len(bad):
                raise DMDError(f"--resume: the run's config.json has no {_listed(older)}: it was written by an older "
                               f"engine, which is the one to resume it with (or start a new run in another folder)")
            what = _listed([f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" if k in saved_keys
                            else f"{k}: absent (an older engine wrote the run)" for k in bad], sep="; ")
            raise DMDError(f"--resume: the config differs from the run's in keys that define the training ({what}); "
                           f"resume with the run's config, or start a new run in another folder")
        return changed
    foreign = sorted(p.name for p in out.iterdir() if p.name not in KEEP) if out.is_dir() else []
    if foreign and not overwrite:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise DMDError(f"--out '{out}' is not empty ({shown}): continue that run with --resume, choose another "
                       f"folder, or pass --overwrite to replace its content")
    try:  # an empty folder now, so an unusable path costs nothing
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DMDError(f"--out '{out}' cannot be created ({e.strerror})") from None
    return {}


def clear(out: Path):
    """--overwrite: removes everything in OUT but pairs/, as a whole, before the new run writes anything."""
    for p in out.iterdir():
        if p.name in KEEP:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
