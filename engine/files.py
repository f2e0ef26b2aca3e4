"""File helpers every part of the engine shares: repository-relative paths, atomic writes and folder swaps."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resolve_path(p: str) -> Path:
    """A path as given, else relative to the repository root (so shipped assets work from any cwd)."""
    path = Path(p)
    if path.exists() or path.is_absolute():
        return path
    return ROOT / path if (ROOT / path).exists() else path


def ensure_dir(path: str | Path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def atomic_write_text(path: str | Path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def swap_in(tmp: Path, final: Path):
    """Replaces folder `final` by the complete folder `tmp`; the old one is deleted only after the rename, so a
    kill at any point leaves a whole folder at `final` or at '.' + name + '.old' (see recover_swapped)."""
    old = final.with_name("." + final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_swapped(final: Path):
    """After a kill between swap_in's two renames, `final` is missing and its old copy is whole: put it back."""
    old = final.with_name("." + final.name + ".old")
    if not final.exists() and old.is_dir():
        old.rename(final)
