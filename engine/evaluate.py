"""Score text-to-image samples: FID and FD_CLIP against a folder of reference images, and CLIP score.

    python engine/evaluate.py samples.npz --ref coco/val2014 --fid-size 256 --json metrics.json
    python engine/evaluate.py samples_folder/ --prompts prompts.txt --metrics clip --clip path/to/clip

Samples: an .npz from engine/infer.py (images uint8 N×H×W×C, labels, and for text models prompts), or a folder:
its samples.npz when present, else its PNGs in sample order (grid.png excluded). --prompts FILE gives or
replaces the prompts: one line per image, or, for an .npz with labels, one line per label (the prompt index
infer.py records).

FID: samples and references are centre-cropped to squares and resized (Lanczos) to --fid-size (default: the
samples' side; DMD2's COCO protocol uses 256), then clean-fid "clean" mode and its TorchScript Inception; see
engine/metrics.py for the protocol and its source. Reference statistics are cached (--ref-stats, else next to
--json, else next to the samples) and reused while the folder, its files, the size and the Inception file match.
CLIP score: 100 * max(cos, 0) averaged, with a transformers CLIPModel (--clip). FD_CLIP: the Frechet distance
of the same two sets in that CLIP model's image-embedding space, a second feature space beside Inception's; its
reference statistics are cached the same way, keyed by the CLIP weights. Nothing is downloaded.
"""
if __name__ == "__main__":  # run as a script from a checkout: the repo root on sys.path
    import _bootstrap  # noqa: F401

import argparse
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from engine import cli, metrics
from engine.devices import pick_device
from engine.errors import DMDError
from engine.files import atomic_write_text, resolve_path
from engine.text2image import load_prompts


class PngImages:
    """A folder's PNGs, read one at a time (30k images at 512 px are 24 GB as one array)."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i) -> np.ndarray:
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return np.asarray(im.convert("RGB"))


def _read_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as f:
            if "images" not in f:
                raise DMDError(f"{path}: no 'images' array (uint8 N×H×W×C) in it; found {list(f.keys())}")
            images = f["images"]
            labels = f["labels"] if "labels" in f else None
            prompts = f["prompts"] if "prompts" in f else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DMDError(f"{path}: not an .npz of plain arrays ({str(e).splitlines()[0][:120]})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise DMDError(f"{path}: 'images' must be uint8 N×H×W×C with C 1 or 3, got {images.dtype}{list(images.shape)}")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise DMDError(f"{path}: 'labels' must be N integers, got {labels.dtype}{list(labels.shape)}")
    if prompts is not None and (prompts.dtype.kind != "U" or prompts.ndim != 1):
        raise DMDError(f"{path}: 'prompts' must be a 1-D array of strings, got {prompts.dtype}{list(prompts.shape)}")
    if prompts is not None and len(prompts) != len(images):
        raise DMDError(f"{path}: {len(images)} images but {len(prompts)} prompts")
    return images, labels, prompts


def png_samples(folder: Path) -> list[Path]:
    """infer.py's numbered PNGs in sample order (00000_..., by number, so 100000 follows 99999); a folder of
    other PNGs: all of them by name. grid.png is never a sample."""
    numbered = [p for p in folder.glob("*.png") if re.match(r"^\d{5,}_", p.name)]
    if numbered:
        return sorted(numbered, key=lambda p: int(p.name.split("_", 1)[0]))
    return sorted(p for p in folder.glob("*.png") if p.name != "grid.png")


def read_samples(path: Path, prompts_file: str | None):
    """(images, prompts or None): images index to uint8 H×W×C arrays."""
    labels = prompts = None
    if path.is_dir():
        if (path / "samples.npz").is_file():
            images, labels, prompts = _read_npz(path / "samples.npz")
        else:
            files = png_samples(path)
            if not files:
                raise DMDError(f"{path}: no samples.npz and no .png files in it")
            images = PngImages(files)
    elif path.is_file():
        images, labels, prompts = _read_npz(path)
    else:
        raise DMDError(f"samples not found: {path}")
    if prompts_file:
        pf = resolve_path(prompts_file)
        lines = load_prompts(prompts_file)  # as infer.py read them: blank lines skipped, so label i is line i
        n = len(images)
        if len(lines) == n:
            prompts = np.array(lines)
        elif labels is not None and labels.min() >= 0 and labels.max() < len(lines):
            prompts = np.array(lines)[labels]  # infer.py: labels are prompt indices into the prompts file
        else:
            why = f" (nor one per label: labels reach {labels.max()})" if labels is not None else ""
            raise DMDError(f"{pf} has {len(lines)} prompts, the samples {n} images{why}")
    return images, prompts


NAMES = {"fid": "FID", "clip": "CLIP score", "fd_clip": "FD_CLIP"}


def _wanted(spec: str | None, ref: str | None, prompts, clip_given: bool) -> list[str]:
    asked = [m.strip() for m in (spec or ",".join(NAMES)).split(",") if m.strip()]
    if not asked or any(m not in NAMES for m in asked):
        raise DMDError(f"--metrics takes one or more of fid, clip, fd_clip (comma-separated); got '{spec}'")
    out = []
    for m in dict.fromkeys(asked):
        # by default FD_CLIP rides along when a CLIP model is loaded anyway or named: never a default download try
        missing = ("no reference folder (--ref FOLDER)" if m in ("fid", "fd_clip") and not ref else
                   "no prompts (the samples have none; give --prompts FILE)" if m == "clip" and prompts is None else
                   "no CLIP model (--clip PATH_OR_ID)" if m == "fd_clip" and not (spec or clip_given or "clip" in out)
                   else None)
        if missing and spec:
            raise DMDError(f"cannot compute {NAMES[m]}: {missing}")
        if missing:
            print(f"{NAMES[m]}: skipped, {missing}")
        else:
            out.append(m)
    if not out:
        raise DMDError("nothing to compute: FID and FD_CLIP need --ref FOLDER, CLIP score needs prompts")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help=".npz written by engine/infer.py, or a folder of PNGs (or holding samples.npz)")
    p.add_argument("--prompts", help="one prompt per line: per image in order, or per label for an .npz with labels")
    p.add_argument("--metrics", help="any of fid, clip, fd_clip, comma-separated (default: all, each skipped when its "
                   "input is missing)")
    p.add_argument("--ref", help="reference image folder for FID and FD_CLIP (searched recursively), e.g. COCO val2014")
    p.add_argument("--fid-size", "--ref-size", dest="fid_size", type=int,
                   help="side both sets are cropped and resized to before clean-fid (default: the samples' side)")
    p.add_argument("--ref-stats", help="cache file of the reference statistics (default: a key-named .npz next to "
                   "--json, else next to the samples); FD_CLIP's goes beside it, its name ending .fd_clip.npz")
    p.add_argument("--inception", help=f"clean-fid's {metrics.INCEPTION_NAME} (file or folder; default: where "
                   "clean-fid and torch hub keep it)")
    p.add_argument("--clip", help=f"CLIP folder or Hugging Face cache id, for CLIP score and FD_CLIP (default: "
                   f"{metrics.DEFAULT_CLIP}, the transformers export of the OpenCLIP ViT-g-14 DMD2 scores with)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image loading processes")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.batch_size < 1 or args.workers < 0 or (args.fid_size is not None and args.fid_size < 1):
        raise DMDError("--batch-size and --fid-size must be >= 1, --workers >= 0")
    device = pick_device(args.device)
    samples = Path(args.samples)
    images, prompts = read_samples(samples, args.prompts)
    wanted = _wanted(args.metrics, args.ref, prompts, args.clip is not None)
    clip_spec = args.clip or metrics.DEFAULT_CLIP
    first = np.asarray(images[0])
    res = {"samples": str(samples), "num_samples": len(images), "device": str(device)}
    # every input is checked before the first long loop
    if "fid" in wanted:
        inception = metrics.find_inception(args.inception)
    if "fid" in wanted or "fd_clip" in wanted:
        ref = resolve_path(args.ref)
        files = metrics.list_images(ref)
        size = args.fid_size or min(first.shape[:2])
        res.update(reference=str(ref), num_reference=len(files), fid_size=size)
        cache_dir = Path(args.json).parent if args.json else (samples.parent if samples.is_file() else
                                                              samples.resolve().parent)
        ref_stats = Path(args.ref_stats) if args.ref_stats else None
    clip = metrics.load_clip(clip_spec, device) if {"clip", "fd_clip"} & set(wanted) else None
    loader = dict(device=device, batch_size=args.batch_size, workers=args.workers)

    if "fid" in wanted:
        net = metrics.load_inception(inception, device)
        sha = metrics.inception_sha256(inception)
        mu, sigma, cache, reused = metrics.reference_stats(
            "fid", ref, files, size, sha, lambda: metrics.folder_features(files, net, size, **loader), ref_stats,
            cache_dir)
        print(f"reference statistics: {'reused' if reused else 'computed and saved'}: {cache}")
        res.update(fid=metrics.fid(images, mu, sigma, net, size, **loader), reference_stats=str(cache),
                   inception=str(inception), inception_sha256=sha)
        del net
    if "clip" in wanted:
        res.update(clip_score=metrics.clip_score(images, prompts, clip, **loader), clip_model=clip_spec)
    if "fd_clip" in wanted:
        fp = metrics.clip_fingerprint(clip)
        mu, sigma, cache, reused = metrics.reference_stats(
            "fd_clip", ref, files, size, fp, lambda: metrics.clip_features(files, clip, size, "FD_CLIP reference",
                                                                           **loader),
            ref_stats and ref_stats.with_name(f"{ref_stats.stem}.fd_clip.npz"), cache_dir)
        print(f"FD_CLIP reference statistics: {'reused' if reused else 'computed and saved'}: {cache}")
        feats = metrics.clip_features(images, clip, size, "FD_CLIP samples", **loader)
        res.update(fd_clip=metrics.distance("FD_CLIP", feats, mu, sigma), fd_clip_reference_stats=str(cache),
                   clip_model=clip_spec, clip_fingerprint=fp)

    rows = [("samples", f"{samples}: {len(images)} images, {first.shape[1]}x{first.shape[0]}")]
    if "reference" in res:
        rows += [("reference", f"{res['reference']}: {len(files)} images")]
    if "fid" in res:
        rows += [("FID", f"{res['fid']:.4f}  (clean-fid, {inception.name} sha256 {sha[:12]}, {size} px)")]
    if "fd_clip" in res:
        rows += [("FD_CLIP", f"{res['fd_clip']:.4f}  ({clip_spec} image embeddings, weights {fp[:12]}, {size} px)")]
    if "clip_score" in res:
        rows += [("CLIP score", f"{res['clip_score']:.4f}  ({clip_spec}, 100 * max(cos, 0))")]
    print("\n".join(f"{k:<12} {v}" for k, v in rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2))


if __name__ == "__main__":
    cli.main_guard(main)
