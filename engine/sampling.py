"""Drawing samples from a trained generator or from the teacher, and writing them as .npz and image grids."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.samplers import sample as ode_sample



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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_grid(images: np.ndarray, path, nrow: int = 10, scale: int = 4):
    """Tile uint8 (N, H, W, C) images into one PNG, each image upscaled `scale` times (nearest)."""
    from PIL import Image
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
