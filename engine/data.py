"""The embedded data set: scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes).

Pixels (0..16) are mapped to [-1, 1]. A fixed stratified split keeps 20 % held out: the held-out digits
measure the metric's floor (real vs real) and the classifier's accuracy, and are never trained on.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10


def load_digits(split: str = "train", resolution: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns images (N, 1, R, R) float32 in [-1, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split
    if resolution % 8:
        raise ValueError(f"digits resolution must be a multiple of 8, got {resolution}")
    d = _load()
    x, y = d.images.astype(np.float32), d.target.astype(np.int64)
    idx_tr, idx_ho = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    idx = {"train": idx_tr, "heldout": idx_ho, "all": np.arange(len(y))}.get(split)
    if idx is None:
        raise ValueError(f"unknown digits split '{split}' (train, heldout, all)")
    img = torch.from_numpy(x[np.sort(idx)] / 8.0 - 1.0)[:, None]
    if resolution != 8:
        img = F.interpolate(img, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return img.contiguous(), torch.from_numpy(y[np.sort(idx)])


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
