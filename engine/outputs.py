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
from .sampling import save_grid, scatter, to_uint8

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


class SampleSink:
    """Takes samples batch by batch (engine/sampling.draw's `sink`), so memory holds one batch, not the whole
    request (COCO-30k at 512 px is 23.6 GB): images go to a disk-backed array and, for a folder, straight to
    their PNGs. close() writes samples.npz (streamed from that array), the grid, and swaps the result in;
    abort() leaves the earlier output as it was.

    out ending in .npz: that file (+ `grid` if given); otherwise a folder. prompts: each sample's prompt."""

    def __init__(self, out, n: int, prompts: list[str] | None = None, grid=None):
        self.out, self.n, self.prompts, self.grid = Path(out), n, prompts, grid
        check_out(self.out, grid)
        self.folder = self.out.suffix != ".npz"
        self.tmp = self.out.with_name(f".{self.out.name}.partial{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.images, self.points, self.k, self.pngs = None, [], 0, 0
        self.labels = np.zeros(n, np.int64)

    def add(self, x: torch.Tensor, labels=None):
        b = len(x)
        if labels is not None:
            self.labels[self.k: self.k + b] = labels.numpy()
        if x.ndim != 4:  # the toy's 2-D points: small, kept in memory
            self.points.append(x.float().numpy())
        else:
            a = x.numpy() if x.dtype == torch.uint8 else to_uint8(x)
            if self.images is None:
                self.images = np.lib.format.open_memmap(self.tmp / ".images.npy", mode="w+", dtype=np.uint8,
                                                        shape=(self.n, *a.shape[1:]))
            self.images[self.k: self.k + b] = a
            if self.folder:
                self.pngs += _pngs(self.tmp, a, self.labels, self.prompts, self.k)
        self.k += b

    def close(self) -> dict:
        try:
            arrays = {"samples": np.concatenate(self.points).astype(np.float32)} if self.images is None else \
                {"images": self.images, "labels": self.labels}
            if self.prompts:
                arrays["prompts"] = np.asarray(self.prompts, dtype=str)
            np.savez(self.tmp / "samples.npz", **arrays)
            grid = self.tmp / "grid.png" if self.folder else self.grid
            if grid and self.images is not None:
                save_grid(np.asarray(self.images[:100]), grid, captions=self.prompts[:100] if self.prompts else None)
            elif grid:
                scatter(arrays["samples"], grid)
            self.images = None  # the memory map closed before its file goes
            (self.tmp / ".images.npy").unlink(missing_ok=True)
            if not self.folder:
                os.replace(self.tmp / "samples.npz", self.out)
                return {"samples": self.out, **({"grid": Path(self.grid)} if self.grid else {})}
            _swap_in(self.tmp, self.out)
        finally:
            self.abort()
        written = {"samples": self.out / "samples.npz", "grid": self.out / "grid.png", "pngs": self.pngs}
        if self.grid:
            shutil.copyfile(self.out / "grid.png", self.grid)
            written["grid"] = Path(self.grid)
        return written

    def abort(self):
        self.images = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path):
    """tmp becomes out; the earlier out is removed only once the new one is in place, and put back if not."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_samples(out, x: torch.Tensor, labels, prompts: list[str] | None = None, grid=None) -> dict:
    """All samples at once through a SampleSink; returns the paths written, by kind."""
    sink = SampleSink(out, len(x), prompts, grid)
    try:
        sink.add(x, labels)
        return sink.close()
    except BaseException:
        sink.abort()
        raise


def _pngs(folder: Path, images: np.ndarray, labels: np.ndarray, prompts, start: int) -> int:
    from PIL import Image
    for j, im in enumerate(images):
        i = start + j
        name = slug(prompts[i]) if prompts else f"class{int(labels[i])}"
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:05d}_{name}.png")
    return len(images)
