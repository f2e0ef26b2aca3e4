"""Text-to-image metrics: FID through clean-fid against a folder of reference images (reference statistics cached),
FD_CLIP (the same Frechet distance in CLIP image-embedding space) and CLIP score with a transformers CLIPModel.

FID protocol. Every image, sample and reference alike, is centre-cropped to a square on its short side (offsets
rounded as torchvision's center_crop rounds them) and resized to one side with PIL Lanczos; then clean-fid "clean"
mode takes over: PIL bicubic on float32 channels to 299x299, its TorchScript Inception (inception-2015-12-05.pt,
the StyleGAN/ADA export of the TF-slim 2015 weights), 2048-d pool features, the Frechet distance of the two
feature Gaussians. This is what DMD2 does for COCO (tianweiy/DMD2, main/coco_eval/coco_evaluator.py compute_fid,
called from main/test_folder_sd.py and main/sdxl/test_folder_sdxl.py): the same centre-crop + Lanczos transform on
both sets, at --eval_res 256 by default, against the whole val2014 folder, 30k samples for COCO-30k prompts. Here
the side defaults to the samples' resolution (nothing resamples the samples); give 256 to match DMD2's numbers.

The Frechet distance is clean-fid's formula, ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with tr sqrt
taken from symmetric eigendecompositions instead of scipy's sqrtm of the non-symmetric product: the same value
(tests check it against clean-fid's frechet_distance), but seconds instead of ~15 s a call for 2048-d on a
2-core CPU, and no imaginary parts when a covariance is singular (fewer samples than dimensions).

CLIP score: 100 * max(cos(image embedding, text embedding), 0), averaged over the samples (the CLIPScore
paper's per-image clamp with w = 100; torchmetrics clamps the mean instead), images preprocessed by the model's own CLIPImageProcessor, prompts truncated to its context. DMD2
reports the plain mean cosine of OpenCLIP ViT-g-14 (laion2b_s12b_b42k) after prefixing each caption with
"A photo depicts " and a 256 px Lanczos resize; the transformers export of those weights is DEFAULT_CLIP.

FD_CLIP: a second feature space, so that a model is not judged by ImageNet-class features alone (Kynkäänniemi et
al. 2023, "The Role of ImageNet Classes in Frechet Inception Distance", find FID can be moved by matching ImageNet
class histograms without better images, and recommend CLIP features). Both sets get FID's centre-crop + Lanczos to
the same side, then the CLIP model's own image processor; the features are the projected image embeddings,
unnormalised (CLIPModel.get_image_features, what clean-fid's "clip_vit_b_32" mode takes from OpenAI CLIP); the
distance is `frechet` on their unbiased covariances, as for FID."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import DMDError
from .files import file_digest

INCEPTION_NAME = "inception-2015-12-05.pt"
DEFAULT_CLIP = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PROTOCOL = "clean-fid clean; centre-crop + PIL Lanczos; v1"  # part of the cache key: change it with the protocol
PROTOCOLS = {"fid": PROTOCOL, "fd_clip": "FD_CLIP; centre-crop + PIL Lanczos, CLIPImageProcessor, image embeds; v1"}


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def inception_dirs() -> list[Path]:
    """Where clean-fid downloads its Inception file (/tmp; the temp dir where that differs), then torch hub's cache."""
    return list(dict.fromkeys([Path("/tmp"), Path(tempfile.gettempdir()), Path(torch.hub.get_dir()) / "checkpoints"]))


def find_inception(path: str | None) -> Path:
    if path:
        p = Path(path)
        p = p / INCEPTION_NAME if p.is_dir() else p
        if not p.is_file():
            raise DMDError(f"Inception weights not found: {p} (clean-fid's TorchScript {INCEPTION_NAME}; "
                           f"nothing is downloaded)")
        return p
    for d in inception_dirs():
        if (d / INCEPTION_NAME).is_file():
            return d / INCEPTION_NAME
    raise DMDError(f"{INCEPTION_NAME} not found in {', '.join(map(str, inception_dirs()))}: put clean-fid's "
                   f"TorchScript Inception file there or pass --inception PATH (nothing is downloaded)")


def load_inception(path: Path, device: torch.device) -> torch.nn.Module:
    """clean-fid's own wrapper (its input normalisation, its 2048-d features) around the file at `path`."""
    from cleanfid.inception_torchscript import InceptionV3W
    with tempfile.TemporaryDirectory() as d:
        folder = path.parent
        if path.name != INCEPTION_NAME:  # the wrapper takes a folder and the fixed file name
            (Path(d) / INCEPTION_NAME).symlink_to(path.resolve())
            folder = Path(d)
        try:
            net = InceptionV3W(str(folder), download=False, resize_inside=False)
        except (RuntimeError, ValueError, AttributeError) as e:
            raise DMDError(f"{path} is not clean-fid's TorchScript Inception ({_first_line(e)})") from None
    return net.to(device).eval()


class CropResize:
    """uint8 H×W×C -> the centred square on the short side, resized to size×size (PIL Lanczos), RGB uint8.
    A class, not a closure, so DataLoader workers can receive it."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: np.ndarray) -> np.ndarray:
        from PIL import Image
        img = to_rgb(img)
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        img = np.ascontiguousarray(img[top:top + s, left:left + s])
        if s != self.size:
            img = np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.LANCZOS))
        return img


def to_rgb(img: np.ndarray) -> np.ndarray:
    img = img[..., None] if img.ndim == 2 else img
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


class _Arrays(torch.utils.data.Dataset):
    """In-memory (or lazily loaded) images through the steps clean-fid's ResizeDataset applies to files."""

    def __init__(self, images, transform):
        from cleanfid.resize import build_resizer
        self.images, self.transform, self.resize = images, transform, build_resizer("clean")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.resize(self.transform(np.asarray(self.images[i])))  # float32 299×299×3 in [0, 255]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def sample_features(images, net, size: int, device, batch_size: int, workers: int) -> np.ndarray:
    from cleanfid.fid import get_batch_features
    loader = torch.utils.data.DataLoader(_Arrays(images, CropResize(size)), batch_size=batch_size,
                                         num_workers=workers)
    return np.concatenate([get_batch_features(b, net, device) for b in tqdm(loader, desc="FID samples")])


def folder_features(files: list[Path], net, size: int, device, batch_size: int, workers: int) -> np.ndarray:
    from cleanfid import fid
    return fid.get_files_features([str(f) for f in files], net, num_workers=workers, batch_size=batch_size,
                                  device=device, mode="clean", custom_image_tranform=CropResize(size),
                                  description="FID reference")


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = feats.astype(np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet(mu1, sigma1, mu2, sigma2, feats1: np.ndarray | None = None) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2). With feats1 (the features sigma1 was computed from)
    and fewer of them than dimensions, tr sqrt(S1 S2) comes from the n×n matrix A S2 Aᵀ/(n-1) (A: centred feats1),
    which has the same non-zero eigenvalues."""
    if feats1 is not None and len(feats1) <= len(mu1):
        a = feats1.astype(np.float64) - mu1
        eig = np.linalg.eigvalsh(a @ sigma2 @ a.T / (len(a) - 1))
    else:
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(w.clip(0))) @ v.T
        eig = np.linalg.eigvalsh(root @ sigma2 @ root)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(eig.clip(0)).sum())


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DMDError(f"reference folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DMDError(f"reference folder {folder} holds no images ({' '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def reference_key(folder: Path, files: list[Path], size: int, net_sha256: str, protocol: str = PROTOCOL) -> str:
    """Changes with the folder, its file list (names, sizes, mtimes), the side, the feature net and the protocol."""
    h = hashlib.sha256(json.dumps([str(folder.resolve()), size, net_sha256, protocol]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_stats(space: str, folder: Path, files: list[Path], size: int, net_sha256: str, features,
                    cache: Path | None, cache_dir: Path):
    """(mu, sigma, cache path, reused?) of features() of the reference images in feature space `space` (a key of
    PROTOCOLS; net_sha256 identifies its network). The cache is `cache` when given, else a file in cache_dir named
    after the key; one whose key differs is recomputed and replaced, never partly written."""
    key = reference_key(folder, files, size, net_sha256, PROTOCOLS[space])
    cache = cache or cache_dir / f"{space}_ref_{folder.resolve().name}_{size}px_{key[:12]}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    return f["mu"], f["sigma"], cache, True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # unreadable: computed again and replaced below
    feats = features()
    mu, sigma = statistics(feats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=key, mu=mu, sigma=sigma, count=len(feats), size=size)
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return mu, sigma, cache, False


def fid(images, ref_mu, ref_sigma, net, size: int, device, batch_size: int, workers: int) -> float:
    return distance("FID", sample_features(images, net, size, device, batch_size, workers), ref_mu, ref_sigma)


def distance(name: str, feats: np.ndarray, ref_mu, ref_sigma) -> float:
    """The Frechet distance of the samples' features to the reference statistics (name: for the error)."""
    if len(feats) < 2:
        raise DMDError(f"{name} needs at least 2 samples")
    mu, sigma = statistics(feats)
    return frechet(mu, sigma, ref_mu, ref_sigma, feats)


def inception_sha256(path: Path) -> str:
    return file_digest(path)["sha256"]


def load_clip(spec: str, device):
    """(model, tokenizer, image processor) from a folder or a Hugging Face cache id, never downloading."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    try:
        model = CLIPModel.from_pretrained(spec, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DMDError(f"CLIP model '{spec}' cannot be loaded: pass --clip a folder (or a model id in the Hugging "
                       f"Face cache) holding a transformers CLIPModel with its tokenizer and preprocessor_config.json;"
                       f" nothing is downloaded ({_first_line(e)})") from None
    return model.to(device).eval(), tok, proc


def clip_fingerprint(clip) -> str:
    """sha256 of what FD_CLIP's features depend on: the vision tower's and projection's tensors and the image
    processor's settings. The bytes, not a name: a folder and a cache id of the same weights share reference stats,
    and weights changed in place do not reuse stale ones."""
    model, _, proc = clip
    h = hashlib.sha256(json.dumps(proc.to_dict(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        if name.startswith(("vision_model.", "visual_projection.")):
            h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\n".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _ClipImages(torch.utils.data.Dataset):
    """Images (arrays, or files of a reference folder) -> FID's crop + resize -> the CLIP processor's pixel values."""

    def __init__(self, images, size: int, proc):
        self.images, self.crop, self.proc = images, CropResize(size), proc

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        if isinstance(img, Path):
            from PIL import Image
            with Image.open(img) as im:
                img = np.asarray(im.convert("RGB"))
        return self.proc(images=self.crop(np.asarray(img)), return_tensors="pt")["pixel_values"][0]


def clip_features(images, clip, size: int, desc: str, device, batch_size: int, workers: int) -> np.ndarray:
    model = clip[0]
    loader = torch.utils.data.DataLoader(_ClipImages(images, size, clip[2]), batch_size=batch_size,
                                         num_workers=workers)
    out = []
    with torch.no_grad():
        for px in tqdm(loader, desc=desc):
            emb = model.visual_projection(model.vision_model(pixel_values=px.to(device)).pooler_output)
            out.append(emb.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


class _ClipInputs(torch.utils.data.Dataset):
    def __init__(self, images, prompts, proc):
        self.images, self.prompts, self.proc = images, prompts, proc

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        px = self.proc(images=to_rgb(np.array(self.images[i])), return_tensors="pt")["pixel_values"][0]
        return px, str(self.prompts[i])


def clip_score(images, prompts, clip, device, batch_size: int, workers: int) -> float:
    model, tok, proc = clip
    context = model.config.text_config.max_position_embeddings
    loader = torch.utils.data.DataLoader(_ClipInputs(images, prompts, proc), batch_size=batch_size,
                                         num_workers=workers)
    scores = []
    with torch.no_grad():
        for px, text in tqdm(loader, desc="CLIP score"):
            t = tok(list(text), padding=True, truncation=True, max_length=context, return_tensors="pt").to(device)
            img = model.visual_projection(model.vision_model(pixel_values=px.to(device)).pooler_output)
            txt = model.text_projection(model.text_model(input_ids=t["input_ids"],
                                                         attention_mask=t["attention_mask"]).pooler_output)
            scores.append(100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).clamp(min=0).float().cpu())
    return float(torch.cat(scores).double().mean())
