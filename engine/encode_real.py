"""Encode a folder of captioned images into a latent real-data folder (engine/real_data.py), with a progress bar.

    python engine/encode_real.py --config configs/sd15_zero3.json --images data/images --out data/real
    deepspeed --num_gpus 8 engine/encode_real.py --config C --images I --out D     # 8 processes, a share each
    torchrun --nproc_per_node 8 engine/encode_real.py --config C --images I --out D

Images: *.png, *.jpg, *.jpeg, *.webp anywhere under --images, in path order (row i is the i-th), each with a
caption: an entry of --images/captions.jsonl ({"file": "a/b.png", "caption": "..."}, the file relative to
--images) or else a same-stem .txt beside the image. An image without one is refused in one line, before any work.
Pixels: centre crop to a square (offset ceil((long - short) / 2), as DALI's centre crop rounds), bilinear resize
to data.resolution (antialiased when shrinking), then [-1, 1]. --loader dali decodes and resizes with NVIDIA DALI
("mixed" decoding on the GPU, "cpu" without one), pil with Pillow (the CPU path); auto = DALI on CUDA when it is
installed, else Pillow. The two agree closely but not bit for bit; each shard's record names its decoder.
Latents: the teacher's vae/ (model.teacher): (vae.encode(x).latent_dist.mean - shift) * scaling_factor, the
posterior mean, so the bytes are a function of the images alone (on the CPU: with the same train.threads), from
one process or many. DMD2 samples the posterior instead (latent_dist.sample()): it differs by the posterior's
std, small for Stable Diffusion's VAE.
The job is the pairs job's (engine/pairs_job.run_shards): each process makes its share of the shards; a run
killed midway keeps its complete shards (run it again to make the rest); rank 0 writes manifest.json last.
--out must be new, empty, or this job's own folder (complete: nothing to do; incomplete or damaged: continued);
anything else, a complete folder made from other images or settings included, is refused in one line.
"""
import _bootstrap  # noqa: F401

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import cli
from engine.config import DMDConfig, load
from engine.errors import DMDError
from engine.kinds import teacher_folder
from engine.make_pairs import ProcessGroup
from engine.pairs_job import STORAGE, ShardJob, Solo, encode, fingerprint, run_shards, shard_plan
from engine.plain import resolve_device
from engine.real_data import (RealDataError, RealReader, autoencoder_hash, real_manifest, shard_problem_real,
                              write_shard)
from models.denoiser import ModelFolderError
from models.text import LatentDecoder

EXTS = (".png", ".jpg", ".jpeg", ".webp")
CROP = "centre square, offset ceil((long - short) / 2); bilinear resize, antialiased; [-1, 1]"
OWN = re.compile(r"manifest\.json|shard_\d{5}\.(x\.npy|label\.npy|captions\.json|json)|\.real-data\.lock"
                 r"|\.(shard_\d{5}(\.\w+)+|manifest\.json)\.tmp\d+")  # what this job writes in --out


def scan(images: Path) -> list[tuple[str, str]]:
    """(path relative to `images`, caption) of every image, in path order."""
    if not images.is_dir():
        raise DMDError(f"--images: folder '{images}' not found")
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*")
                   if p.suffix.lower() in EXTS and p.is_file() and not p.name.startswith("."))
    if not files:
        raise DMDError(f"--images: '{images}' holds no images ({', '.join(EXTS)})")
    listed, jsonl = {}, images / "captions.jsonl"
    if jsonl.is_file():
        for i, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str) or "file" not in entry:
                raise DMDError(f'{jsonl}:{i}: expected {{"file": "...", "caption": "..."}}')
            listed[str(entry["file"])] = entry["caption"]
    unknown = sorted(set(listed) - set(files))
    if unknown:
        raise DMDError(f"{jsonl} names '{unknown[0]}', which is not an image in {images}")
    items = []
    for rel in files:
        txt = (images / rel).with_suffix(".txt")
        if rel not in listed and not txt.is_file():
            raise DMDError(f"image '{images / rel}' has no caption (no {txt.name} beside it, no entry in "
                           f"captions.jsonl)")
        items.append((rel, listed[rel] if rel in listed else txt.read_text(encoding="utf-8").strip()))
    return items


def source_of(images: Path, items) -> dict:
    """The image folder and a fingerprint of its file list (names, sizes, captions): what the latents came from."""
    listing = json.dumps([[rel, (images / rel).stat().st_size, cap] for rel, cap in items])
    return {"images": str(images.resolve()), "files": len(items),
            "fingerprint": hashlib.sha256(listing.encode()).hexdigest()}


class PilImages:
    """The CPU path: Pillow decodes, crops and resizes (see the module doc)."""
    name = "pil"

    def __init__(self, resolution: int):
        self.res = resolution

    def __call__(self, paths) -> torch.Tensor:
        from PIL import Image, ImageOps
        out = []
        for p in paths:
            with Image.open(p) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")  # DALI's decoder applies EXIF orientation too
            w, h = im.size
            s = min(w, h)
            left, top = (w - s + 1) // 2, (h - s + 1) // 2
            im = im.crop((left, top, left + s, top + s)).resize((self.res, self.res), Image.BILINEAR)
            out.append(np.asarray(im, np.float32).transpose(2, 0, 1))
        return torch.from_numpy((np.stack(out) - 127.5) / 127.5)


class DaliImages:
    """NVIDIA DALI decodes (on the GPU: "mixed"), crops and resizes a batch of encoded files."""

    def __init__(self, resolution: int, batch_size: int, device: torch.device):
        import nvidia.dali.math as dmath
        from nvidia.dali import fn, pipeline_def, types
        self.device, gpu = device, device.type == "cuda"
        self.name, self.res = "dali-mixed" if gpu else "dali-cpu", resolution

        # fed one batch at a time (feed_input, then run): nothing to read ahead
        @pipeline_def(batch_size=batch_size, num_threads=min(4, os.cpu_count() or 1), prefetch_queue_depth=1,
                      device_id=(device.index or 0) if gpu else None)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            shape = fn.peek_image_shape(enc, dtype=types.FLOAT)  # on the CPU, so the crop may take it on any device
            side = dmath.min(shape[0], shape[1])
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
            img = fn.crop(img, crop_h=side, crop_w=side)  # centred: crop_pos 0.5
            img = fn.resize(img, size=[resolution, resolution], interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(img, mean=127.5, std=127.5, output_layout="CHW", dtype=types.FLOAT)

        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, paths) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        self.pipe.feed_input("encoded", [np.fromfile(p, np.uint8) for p in paths])
        (out,) = self.pipe.run()
        x = torch.empty((len(out), 3, self.res, self.res), device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(out.as_tensor(), x, cuda_stream=stream)
        return x


def make_decoder(choice: str, resolution: int, batch_size: int, device: torch.device):
    try:
        import nvidia.dali  # noqa: F401
        dali = True
    except ImportError:
        dali = False
    if choice == "dali" and not dali:
        raise DMDError("--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda130, or the project's [gpu] "
                       "extra)")
    if choice == "dali" or (choice == "auto" and dali and device.type == "cuda"):
        return DaliImages(resolution, batch_size, device)
    return PilImages(resolution)


@torch.no_grad()
def to_latents(ae: LatentDecoder, x: torch.Tensor) -> torch.Tensor:
    """The inverse of LatentDecoder's scaling: (posterior mean - shift) * scale (AutoencoderTiny: its latents)."""
    out = ae.vae.encode(x.to(next(ae.vae.parameters()).dtype))
    z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
    return (z.float() - ae.shift) * ae.scale


def check_out(out: Path):
    """--out may be new, empty or hold what this job writes (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise DMDError(f"--out '{out}' is a file, not a folder")
    strangers = sorted(p.name for p in out.iterdir() if not OWN.fullmatch(p.name)) if out.is_dir() else []
    if strangers:
        raise DMDError(f"--out '{out}' holds files a real-data folder does not ({', '.join(strangers[:3])}); give a "
                       f"new or empty folder")


def verdict(out: Path, expect: dict) -> tuple[str, str]:
    """("make", ""): new, empty or this job's incomplete or damaged folder; ("done", ""): complete already;
    ("refuse", why): a complete folder made otherwise."""
    try:
        man = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return "make", ""  # no manifest (a job to continue) or a broken one (remade from the shard records)
    differ = [k for k in expect if not isinstance(man, dict) or man.get(k) != expect[k]]
    if differ:
        return "refuse", (f"--out '{out}' holds real data made from other images or settings ({', '.join(differ)} "
                          f"differ); it is kept: give another --out, or delete it to make it again")
    try:
        RealReader(out, expect)
        return "done", ""
    except RealDataError as e:
        print(f"real-data: {out} is damaged, its intact shards are kept ({e})", flush=True)
        return "make", ""


def make_shards(out, todo, plan, images, items, decoder, ae, fp, args, device, bar):
    for made, k in enumerate(todo, 1):
        start, n = plan[k]
        rows, lat = items[start:start + n], []
        for b in range(0, n, args.batch_size):  # fixed batches per shard: the bytes do not depend on who makes it
            x = decoder([images / rel for rel, _ in rows[b:b + args.batch_size]])
            lat.append(to_latents(ae, x.to(device)).cpu())
            bar.add(len(lat[-1]))
        rec = {"fingerprint": fp, "start": start, "count": n, "decoder": decoder.name, "batch_size": args.batch_size,
               "device": device.type}
        write_shard(out, k, made, rec, encode(torch.cat(lat), args.dtype), np.arange(start, start + n),
                    [cap for _, cap in rows])


def parse_args():
    p = cli.parser(__doc__)
    p.add_argument("--images", required=True,
                   help="folder of images with captions (a .txt beside each, or captions.jsonl)")
    p.add_argument("--batch-size", type=int, default=16, help="images per decode and autoencoder call")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    p.add_argument("--loader", default="auto", choices=("auto", "dali", "pil"), help="image decoder")
    p.add_argument("--dtype", default="float32", choices=tuple(STORAGE), help="latent storage (16 bits: half the disk)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args()
    if args.batch_size < 1 or args.shard_size < 1:
        raise DMDError(f"--batch-size and --shard-size must be positive, got {args.batch_size} and {args.shard_size}")
    return args


def prepare(cfg, args, device):
    """Everything checked before any work: the images and captions, --out, the autoencoder and the resolution.
    Returns the rows, the autoencoder and the manifest the folder will have."""
    out, images = Path(args.out), Path(args.images)
    vae_dir = teacher_folder(cfg) / "vae"
    if not vae_dir.is_dir():
        raise DMDError(f"model.teacher '{vae_dir.parent}' has no vae/ (the autoencoder the latents come from)")
    items = scan(images)
    check_out(out)
    ae = LatentDecoder.from_pretrained(vae_dir).to(device)
    res = cfg.data.resolution
    if res % ae.factor:
        raise DMDError(f"data.resolution = {res} is not a multiple of the autoencoder's factor {ae.factor} ({vae_dir})")
    shape = (ae.vae.config.latent_channels, res // ae.factor, res // ae.factor)
    expect = real_manifest("latents", len(items), shape, args.dtype, args.shard_size, source_of(images, items), True,
                           autoencoder_hash=autoencoder_hash(vae_dir), scaling_factor=ae.scale, shift_factor=ae.shift,
                           resolution=res, crop=CROP, latent="posterior mean")
    return items, ae, expect


def main():
    args = parse_args()
    cfg = load(args.config, DMDConfig, args.set)
    cli.set_threads(cfg.train.threads)  # on the CPU, the latents' bytes depend on the thread count
    out, images, res = Path(args.out), Path(args.images), cfg.data.resolution
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        items, ae, expect = prepare(cfg, args, device)
    except (DMDError, ModelFolderError):
        if int(os.environ.get("RANK", "0")):
            sys.exit(cli.EXIT_BAD_INPUT)  # rank 0 says why, once
        raise
    group = ProcessGroup(cfg.deepspeed.backend) if world > 1 else Solo()
    # rank 0 reads --out and every rank follows its verdict, so all of them stop or go on together
    state, why = group.gather(verdict(out, expect) if group.rank == 0 else None)[0]
    if state == "refuse":
        if group.rank:
            sys.exit(cli.EXIT_BAD_INPUT)
        raise DMDError(why)
    if state == "done" and group.rank == 0:
        print(f"{len(items)} latents of these images are already complete in {out}; nothing to do")
    elif state == "make":
        t0, decoder = time.time(), make_decoder(args.loader, res, args.batch_size, device)
        fp, plan = fingerprint(expect), shard_plan(len(items), args.shard_size)

        def make(todo, bar):
            make_shards(out, todo, plan, images, items, decoder, ae, fp, args, device, bar)
        job = ShardJob("real-data", expect, plan, lambda k: shard_problem_real(out, k, *plan[k], expect, fp), make,
                       f"real data ({decoder.name})", RealDataError)
        run_shards(out, job, group)
        if group.rank == 0:
            print(f"{len(RealReader(out, expect))} latents in {out} ({time.time() - t0:.1f} s)")
    if group.world_size > 1:
        group.close()


if __name__ == "__main__":
    cli.main_guard(main)
