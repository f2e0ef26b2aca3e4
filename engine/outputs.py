"""Where samples go: one .npz, or a folder of PNGs (one per sample) with samples.npz and grid.png beside them.

A folder is written whole under a temporary name next to it and swapped in at the end, so an interrupted run
leaves the previous output as it was; a folder that holds anything else is refused, never emptied.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import DMDError
from .sampling import save_samples, to_uint8

OUR_FILES = re.compile(r"^(\d{5,}_.*\.png|samples\.npz|grid\.png)$")


def slug(text: str, n: int = 40) -> str:
    """A prompt as a file-name part: lower case, runs of other characters as '-', at most n characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-") or "empty"


def check_out(out, grid=None):
    """Refuses, before any sampling, an --out this command may not write: a file where a folder is meant, or
    a folder that is not an earlier output of this command (one holding samples.npz and only its own files)."""
    out = Path(out)
    if grid is not None and not Path(grid).resolve().parent.is_dir():
        raise DMDError(f"--grid: folder '{Path(grid).resolve().parent}' does not exist")
    if out.suffix == ".npz":
        if out.is_dir():
            raise DMDError(f"--out '{out}' is a folder; give a file name ending in .npz, or a folder without .npz")
        return
    if out.exists() and not out.is_dir():
        raise DMDError(f"--out '{out}' exists and is not a folder (give a folder, or a path ending in .npz)")
    if out.is_dir() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if not OUR_FILES.match(p.name))
        if foreign or not (out / "samples.npz").is_file():
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "") if foreign else "no samples.npz"
            raise DMDError(f"--out folder '{out}' is not an earlier output of this command ({shown}); give a new "
                           f"or empty folder")


def write_samples(out, x: torch.Tensor, labels, prompts: list[str] | None = None, grid=None) -> dict:
    """x: uint8 N×H×W×C images (or the toy's float points); labels: class or prompt indices; prompts: each
    sample's prompt (text models). out ending in .npz: that file (+ `grid` if given); otherwise a folder.
    Returns the paths written, by kind."""
    out = Path(out)
    if x.ndim == 4 and x.dtype != torch.uint8:
        x = torch.from_numpy(to_uint8(x))
    meta = {"prompts": np.asarray(prompts, dtype=str)} if prompts else None
    if out.suffix == ".npz":
        save_samples(out, x, labels, grid, meta=meta, captions=prompts)
        return {"samples": out, **({"grid": Path(grid)} if grid else {})}
    check_out(out)
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_samples(tmp / "samples.npz", x, labels, tmp / "grid.png", meta=meta, captions=prompts)
        n_png = _pngs(tmp, x, labels, prompts)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)  # the earlier output back in its place
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    written = {"samples": out / "samples.npz", "grid": out / "grid.png", "pngs": n_png}
    if grid:
        shutil.copyfile(out / "grid.png", grid)
        written["grid"] = Path(grid)
    return written


def _pngs(folder: Path, x: torch.Tensor, labels, prompts) -> int:
    if x.ndim != 4:
        return 0  # the toy's points have no images
    from PIL import Image
    images = x.numpy()
    for i, im in enumerate(images):
        name = slug(prompts[i]) if prompts else f"class{int(labels[i])}" if labels is not None else "sample"
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:05d}_{name}.png")
    return len(images)
