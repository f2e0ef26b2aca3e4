"""Drawing samples from a trained generator or from the teacher, and writing them as .npz and image grids."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.samplers import sample as ode_sample


def noise_shape(generator, sample_shape) -> tuple:
    """The unit noise one sample of `generator` takes: the sample's shape for one step, K stacked noises on the
    channel axis for a K-step generator (models/denoiser.OneStepGenerator.noise_shape), the toy's fixed (2,)."""
    shape = getattr(generator, "noise_shape", None)
    if callable(shape):
        return tuple(shape(sample_shape))
    return tuple(shape) if shape is not None else tuple(sample_shape)


def steps_label(timesteps, details: str = "") -> str:
    """'generator (details)', or for several steps '4-step generator (timesteps 999, 749, 499, 249; details)'."""
    inside = [f"timesteps {', '.join(str(int(t)) for t in timesteps)}"] if timesteps and len(timesteps) > 1 else []
    inside += [details] if details else []
    head = f"{len(timesteps)}-step generator" if timesteps and len(timesteps) > 1 else "generator"
    return f"{head} ({'; '.join(inside)})" if inside else head


def balanced_labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    return torch.arange(n) % num_classes if num_classes else None


@torch.no_grad()
def draw(fn, n: int, shape, num_classes, seed: int = 0, batch_size: int = 500, desc: str = "sampling",
         device="cpu", sink=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Calls fn(z, cond) on batches of seeded unit noise of `shape` per sample (a generator's `noise_shape`
    above, which a K-step generator's samples do not have); returns (samples, labels). fn returns images as
    floats N×C×H×W in [-1, 1] or uint8 N×H×W×C (engine/fast_sampler.py), or the toy's 2-D points.
    sink(samples, labels): takes each batch as it comes (engine/outputs.SampleSink); samples is then None."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=g)
    labels = balanced_labels(n, num_classes)
    out = []
    for b in tqdm(range(0, n, batch_size), desc=desc, leave=False, dynamic_ncols=True):
        c = labels[b: b + batch_size].to(device) if labels is not None else None
        x = fn(z[b: b + batch_size].to(device), c)
        x = x.cpu() if x.dtype == torch.uint8 else x.float().cpu()
        if sink is not None:
            sink(x, labels[b: b + batch_size] if labels is not None else None)
        else:
            out.append(x)
    return (torch.cat(out) if out else None), labels


def with_condition(generator, condition=None, to_images=None):
    """fn(z, labels) for `draw`: condition maps labels to the generator's condition (text models: prompt
    indices -> embeddings), to_images decodes latents."""
    condition = condition or (lambda c: c)
    to_images = to_images or (lambda x: x)
    return lambda z, c: to_images(generator(z, condition(c)))


def teacher_sampler(teacher, sampler: str, steps: int, guidance: float = 1.0):
    return lambda z, c: ode_sample(teacher, z, c, sampler, steps, guidance)


def save_samples(path, x: torch.Tensor, labels, grid: str | Path | None = None, meta: dict | None = None,
                 captions: list[str] | None = None):
    """Images (floats N,C,H,W in [-1,1], or uint8 N,H,W,C) -> npz with images uint8 N×H×W×C and labels;
    2-D points -> key 'samples'. Written to a temporary file and renamed, so a crash never leaves a partial
    .npz behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if x.ndim == 4:
        images = x.numpy() if x.dtype == torch.uint8 else to_uint8(x)
        arrays = {"images": images, "labels": (labels if labels is not None else torch.zeros(len(x))).long().numpy()}
    else:
        arrays = {"samples": x.numpy().astype(np.float32)}
    for k, v in (meta or {}).items():
        arrays[k] = np.asarray(v)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    if grid:
        if x.ndim == 4:
            save_grid(arrays["images"][:100], grid, captions=captions[:100] if captions else None)
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


def uint8_images(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 on x's device: the one rounding every sample path uses."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as a numpy array."""
    return uint8_images(x.detach().cpu()).numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_grid(images: np.ndarray, path, nrow: int | None = None, scale: int = 4, max_side: int = 2048,
              captions: list[str] | None = None):
    """Tile uint8 (N, H, W, C) images into one PNG of at most `max_side` px a side: small images are upscaled
    up to `scale` times (nearest), large ones shrunk to fit. `captions` (one per image, e.g. prompts) are
    written under the grid, numbered as the tiles are (row by row)."""
    from PIL import Image
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = (n + nrow - 1) // nrow
    side = max(rows * (h + 1) + 1, nrow * (w + 1) + 1)
    room = max_side - (_band_height(len(captions)) if captions else 0)  # the caption band counts too
    if side > room:  # shrink each tile so the grid fits; nearest would alias at this ratio
        f = (room - 1) / side
        h2, w2 = max(1, int((h + 1) * f) - 1), max(1, int((w + 1) * f) - 1)
        images = np.stack([np.asarray(Image.fromarray(im[..., 0] if c == 1 else im).resize((w2, h2), Image.BILINEAR))
                           .reshape(h2, w2, c) for im in images])
        n, h, w, c = images.shape
        scale = 1
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, min(scale, max_side // img.width, room // img.height))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if captions:
        img = _with_captions(img.convert("RGB"), captions)
    img.save(path)


LINE_H = 14  # px per caption line (PIL's default bitmap font)


def _band_height(n: int) -> int:
    return LINE_H * n + 6


def _with_captions(img, captions: list[str]):
    """The grid with a white band below: one line per image, "i. caption", cut to the grid's width."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    line_h = LINE_H
    max_chars = max(8, img.width // 7)
    lines = [f"{i + 1}. {t}" if len(t) + 5 <= max_chars else f"{i + 1}. {t[:max_chars - 8]}..."
             for i, t in enumerate(captions)]
    out = Image.new("RGB", (img.width, img.height + _band_height(len(lines))), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, img.height + 3 + i * line_h), line, fill="black", font=font)
    return out
