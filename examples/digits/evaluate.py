"""Evaluate samples: Frechet distance in two independent feature spaces (via clean-fid), class accuracy, and
Inception FID when the Inception weights are on disk.

    python examples/digits/evaluate.py samples.npz [--json metrics.json]
    python examples/digits/evaluate.py --real heldout        # the floor: held-out real digits vs training digits

The reference is the training split. FD is biased by sample count, so every set is scored on subsets of
the held-out split's size (360) and the mean (and std over 20 random subsets) is reported.

Two judges, so that settings tuned on one are checked on the other: `fd` uses the digits classifier's
penultimate features (examples/digits/classifier.py), `fd2` the bottleneck of a denoising autoencoder with
another architecture, objective and seed (examples/digits/judge.py). Both score the same subsets.

Where a gap comes from: each judge also scores the whole set at once (`fd_all`, less biased than a subset's
FD) and splits it into the means' term ||mu - mu_ref||^2 (`fd_all_mean`) and the covariances' term (the
rest); `fd_spread` / `fd2_spread` is the trace of the set's feature covariance over the reference's (below 1:
less varied than the real digits, as a mode-seeking student tends to be), `pixel_spread` the same for the
pixel values themselves.
"""
if __name__ == "__main__":  # run as a script from a checkout: the repo root on sys.path
    import _bootstrap  # noqa: F401

import argparse
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from engine import cli
from engine.errors import DMDError
from engine.files import atomic_write_text, resolve_path
from engine.sampling import from_uint8, to_uint8
from examples.digits.classifier import CleanFIDExtractor, load_classifier
from examples.digits.data import load_digits
from examples.digits.judge import SPACE, load_judge

CLASSIFIER = "assets/digits_classifier"
JUDGE = "assets/digits_judge"
INCEPTION_FILE = Path(tempfile.gettempdir()) / "inception-2015-12-05.pt"  # where clean-fid looks for it


def read_samples(path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with np.load(path) as f:
            if "images" not in f or "labels" not in f:
                raise DMDError(f"{path}: expected arrays 'images' (uint8 N×H×W×C) and 'labels' (N), found "
                               f"{list(f.keys())}")
            img, lab = f["images"], f["labels"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as e:  # not an .npz, or pickled objects
        raise DMDError(f"{path}: not an .npz of plain arrays ({str(e).splitlines()[0][:120]})") from None
    if img.dtype != np.uint8 or img.ndim != 4 or len(lab) != len(img):
        raise DMDError(f"{path}: 'images' must be uint8 N×H×W×C with one label each, got {img.dtype}{list(img.shape)}"
                           f" and {len(lab)} labels")
    if img.shape[-1] != 1 or img.shape[1] != img.shape[2] or img.shape[1] % 8:
        raise DMDError(f"{path}: this evaluator scores class-conditional digits (1-channel square images, a side that "
                       f"is a multiple of 8) against the digits training split; got images {list(img.shape[1:])} "
                       f"(scoring text-to-image samples is not implemented yet)")
    return img, lab.astype(np.int64)


def _write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    from PIL import Image
    files = []
    for i, im in enumerate(images):
        f = folder / f"{i:06d}.png"
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(f)
        files.append(str(f))
    return files


def clean_fid_features(images: np.ndarray, model, batch_size: int = 500) -> np.ndarray:
    """Features through clean-fid's own file pipeline (PNG round trip, its loader), at native resolution."""
    from cleanfid import fid
    with tempfile.TemporaryDirectory() as d:
        files = _write_pngs(images, Path(d))
        return fid.get_files_features(files, model=model, num_workers=0, batch_size=batch_size,
                                      device=torch.device("cpu"), mode="clean", custom_fn_resize=lambda x: x,
                                      verbose=False)


def frechet(feats: np.ndarray, ref_mu, ref_sigma) -> float:
    from cleanfid import fid
    return float(fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref_mu, ref_sigma))


def pixel_variance(images: np.ndarray) -> float:
    """The pixel values' variance over a set, summed over pixels (ddof 1, as np.cov takes the features')."""
    return float(images.reshape(len(images), -1).astype(np.float64).var(0, ddof=1).sum())


class Evaluator:
    def __init__(self, classifier=CLASSIFIER, resolution: int = 8, judge=JUDGE):
        self.clf = load_classifier(resolve_path(classifier))
        # result key -> feature extractor; each has its own reference statistics of the training split
        self.extractors = {"fd": CleanFIDExtractor(self.clf), "fd2": CleanFIDExtractor(load_judge(resolve_path(judge)))}
        ref = to_uint8(load_digits("train", resolution)[0])
        self.ref_stats = {}
        self.ref_pixel_var = pixel_variance(ref)
        for key, extractor in self.extractors.items():
            f = clean_fid_features(ref, extractor)
            self.ref_stats[key] = f.mean(0), np.cov(f, rowvar=False)
        self.subset = len(load_digits("heldout", resolution)[1])
        self.ref_images = ref

    def __call__(self, images: np.ndarray, labels: np.ndarray, subsets: int = 20, seed: int = 0) -> dict:
        n = min(self.subset, len(images))
        rng = np.random.default_rng(seed)
        picks = [rng.permutation(len(images))[:n] for _ in range(subsets)]  # the same subsets for both judges
        res = {}
        for key, extractor in self.extractors.items():
            feats = clean_fid_features(images, extractor)
            fds = [frechet(feats[i], *self.ref_stats[key]) for i in picks]
            res.update({key: float(np.mean(fds)), f"{key}_std": float(np.std(fds))})
            mu_ref, cov_ref = self.ref_stats[key]
            res.update({f"{key}_all": frechet(feats, mu_ref, cov_ref),
                        f"{key}_all_mean": float(((feats.mean(0) - mu_ref) ** 2).sum()),
                        f"{key}_spread": float(np.trace(np.cov(feats, rowvar=False)) / np.trace(cov_ref))})
        res["pixel_spread"] = pixel_variance(images) / self.ref_pixel_var
        with torch.no_grad():
            pred = self.clf(from_uint8(images)).argmax(1).numpy()
        return {**res, "subset_size": n, "subsets": subsets, "accuracy": float((pred == labels).mean()),
                "num_samples": len(images)}


def inception_fid(images: np.ndarray, ref_images: np.ndarray) -> float | None:
    if not INCEPTION_FILE.is_file():
        return None
    from cleanfid import fid
    model = fid.build_feature_extractor("clean", torch.device("cpu"), use_dataparallel=False)
    to3 = lambda a: np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        _write_pngs(to3(images), Path(d1))
        _write_pngs(to3(ref_images), Path(d2))
        return float(fid.compute_fid(d1, d2, custom_feat_extractor=model, mode="clean", num_workers=0,
                                     device=torch.device("cpu"), verbose=False))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help=".npz with images (uint8 N×H×W×C) and labels")
    p.add_argument("--real", choices=["heldout", "train"], help="score real digits instead of a file")
    p.add_argument("--subsets", type=int, default=20)
    p.add_argument("--classifier", default=CLASSIFIER)
    p.add_argument("--judge", default=JUDGE, help="the second judge's folder (examples/digits/train_judge.py)")
    p.add_argument("--json", help="also write the metrics here")
    args = p.parse_args()
    if not args.samples and not args.real:
        p.error("give a samples .npz or --real heldout")
    if args.real:
        x, y = load_digits(args.real)
        images, labels, name = to_uint8(x), y.numpy(), f"real {args.real} digits"
    else:
        images, labels = read_samples(args.samples)
        name = args.samples
    ev = Evaluator(args.classifier, images.shape[1], args.judge)
    m = ev(images, labels, args.subsets)
    m["inception_fid"] = inception_fid(images, ev.ref_images)
    print(f"{name}: {m['num_samples']} samples")
    print(f"  Frechet distance (digits-classifier features, clean-fid, vs train, {m['subsets']} subsets of "
          f"{m['subset_size']}): {m['fd']:.3f} ± {m['fd_std']:.3f}")
    print(f"  Frechet distance, judge 2 (digits {SPACE} features, clean-fid, vs train, the same subsets): "
          f"{m['fd2']:.3f} ± {m['fd2_std']:.3f}")
    for key, judge in (("fd", "judge 1"), ("fd2", "judge 2")):
        print(f"  the whole set, {judge}: FD {m[key + '_all']:.3f} = means {m[key + '_all_mean']:.3f} + covariances "
              f"{m[key + '_all'] - m[key + '_all_mean']:.3f}; feature spread {m[key + '_spread']:.3f} x the real "
              f"digits'")
    print(f"  pixel spread: {m['pixel_spread']:.3f} x the real digits'")
    print(f"  class accuracy: {100 * m['accuracy']:.2f} %")
    if m["inception_fid"] is None:
        print(f"  Inception FID: not computed (Inception weights not found at {INCEPTION_FILE}; they cannot be "
              f"downloaded here)")
    else:
        print(f"  Inception FID: {m['inception_fid']:.3f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"samples": name, **m}, indent=2))


if __name__ == "__main__":
    cli.main_guard(main)
