"""Drawing samples from a trained generator or from the teacher, and writing them as .npz."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.samplers import sample as ode_sample

from .data import save_grid, to_uint8


def balanced_labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    return torch.arange(n) % num_classes if num_classes else None


@torch.no_grad()
def draw(fn, n: int, shape, num_classes, seed: int = 0, batch_size: int = 500, desc: str = "sampling",
         device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calls fn(z, cond) on batches of seeded unit noise; returns (samples, labels)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=g)
    labels = balanced_labels(n, num_classes)
    out = []
    for b in tqdm(range(0, n, batch_size), desc=desc, leave=False, dynamic_ncols=True):
        c = labels[b: b + batch_size].to(device) if labels is not None else None
        out.append(fn(z[b: b + batch_size].to(device), c).float().cpu())
    return torch.cat(out), labels


def one_step(generator, condition=None, to_images=None):
    """fn(z, labels) for `draw`: condition maps labels to the generator's condition (text models: prompt
    indices -> embeddings), to_images decodes latents."""
    condition = condition or (lambda c: c)
    to_images = to_images or (lambda x: x)
    return lambda z, c: to_images(generator(z, condition(c)))


def teacher_sampler(teacher, sampler: str, steps: int, guidance: float = 1.0):
    return lambda z, c: ode_sample(teacher, z, c, sampler, steps, guidance)


def save_samples(path, x: torch.Tensor, labels, grid: str | Path | None = None, meta: dict | None = None):
    """Images (N,C,H,W in [-1,1]) -> npz with images uint8 N×H×W×C and labels; 2-D points -> key 'samples'.
    Written to a temporary file and renamed, so a crash never leaves a partial .npz behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        arrays = {"images": to_uint8(x), "labels": (labels if labels is not None else torch.zeros(len(x))).long().numpy()}
    else:
        arrays = {"samples": x.numpy().astype(np.float32)}
    for k, v in (meta or {}).items():
        arrays[k] = np.asarray(v)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    if grid:
        if x.ndim == 4:
            save_grid(arrays["images"][:100], grid)
        else:
            scatter(arrays["samples"], grid)


def scatter(points: np.ndarray, path, title: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    ax.set_xlim(-6, 6), ax.set_ylim(-3, 3), ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
