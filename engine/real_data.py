"""Real data for losses that need it (DMD2's GAN discriminator): a folder format, its reader and its feed.

A real-data folder holds plain .npy shards, like a pairs folder (engine/pairs.py), so any reader can use them:
    shard_00000.x.npy          (n, *shape)  dtype   images in [-1, 1] ("pixels") or autoencoder latents ("latents")
    shard_00000.label.npy      (n,)         int64   class label; captioned data: the row's caption index
    shard_00000.captions.json  captioned data only: the shard's captions, one per row
    shard_00000.json           the shard's record: its parts' sizes and sha256, and which job made it (latents:
                               which image decoder and batch size made the shard; a reader does not care)
    manifest.json              format "dmd-real/1", kind, count, shape, dtype, the source (and, for latents, the
                               autoencoder's weights hash, scaling factor, resolution and crop rule), the shards
                               with their sizes and sha256 (checked when a reader opens the folder)
dtype: float32, float16, or bfloat16 stored as uint16 (as pairs; readers get float32 back either way).
The manifest is written last: a folder without one is incomplete. Two writers: write_pixel_folder (data in
memory, e.g. the digits training split: examples/digits/make_real.py) and engine/encode_real.py (a folder of
captioned images encoded to latents: distributed and resumable, the pairs job's skeleton).
Batches come from engine.pairs.BatchSampler and reach the step through make_real_feed (numpy or DALI, shared
with the pairs: engine/pair_loader.py).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from models import weights_hash

from .errors import DMDError
from .faults import kill_hook
from .files import atomic_write_text, file_digest, read_manifest, recover_swapped, resolve_path, swap_in
from .pair_loader import make_feed
from .pairs_job import (MISSING, STORAGE, decode, encode, fingerprint, part_path, part_problem, record_path,
                        shard_plan, shard_problem, write_manifest, write_part)

FORMAT = "dmd-real/1"
KINDS = ("pixels", "latents")


class RealDataError(DMDError):
    """A real-data folder that is missing, incomplete, corrupt or made for another run."""


def real_manifest(kind: str, count: int, shape, dtype: str, shard_size: int, source: dict, captioned: bool,
                  **extra) -> dict:
    """The manifest's fields (all but the shards); their hash is the fingerprint each shard's record carries."""
    return {"format": FORMAT, "kind": kind, "count": int(count), "shape": list(shape), "dtype": dtype,
            "captioned": captioned, "shard_size": shard_size, "source": source, **extra}


def expected(kind: str, shape, autoencoder_hash: str | None = None, scaling_factor: float | None = None) -> dict:
    """What a run checks of a real-data folder (RealReader's `expect`): the kind and sample shape, and for
    latents the autoencoder that made them (autoencoder_hash below) and its scaling factor."""
    out = {"format": FORMAT, "kind": kind, "shape": list(shape)}
    if autoencoder_hash is not None:
        out["autoencoder_hash"] = autoencoder_hash
    if scaling_factor is not None:
        out["scaling_factor"] = scaling_factor
    return out


def autoencoder_hash(vae_folder) -> str:
    """The hash latents are pinned to: sha256 of the autoencoder folder's weight files (the teacher's vae/)."""
    return weights_hash(vae_folder)


def captions_path(folder: Path, k: int) -> Path:
    return Path(folder) / f"shard_{k:05d}.captions.json"


def wants(expect: dict, n: int):
    """(part, shape, on-disk dtype) of a shard of n rows."""
    return (("x", (n, *expect["shape"]), STORAGE[expect["dtype"]]), ("label", (n,), np.dtype(np.int64)))


def shard_problem_real(folder: Path, k: int, start: int, n: int, expect: dict, fp: str) -> str | None:
    """Why shard k cannot be kept as rows [start, start + n) of this job (None: it can)."""
    problem = shard_problem(folder, k, start, n, expect, fp, wants(expect, n))
    if problem == MISSING and captions_path(folder, k).exists():
        return "killed before it was complete"
    if problem or not expect["captioned"]:
        return problem
    rec = json.loads(record_path(folder, k).read_text())  # readable: shard_problem has read it
    path = captions_path(folder, k)
    if not path.is_file():
        return f"{path.name} is missing"
    if (file_digest(path)["sha256"], rec.get("captions")) != (rec.get("captions_sha256"), path.name):
        return f"{path.name} does not match the record's checksum (changed after it was written)"
    return None


def write_shard(folder: Path, k: int, made: int, rec: dict, x: np.ndarray, labels: np.ndarray, captions=None):
    """Shard k's parts, then its record (the commit): `rec` plus each part's name, size and sha256."""
    rec = dict(rec)
    rec.update(write_part(part_path(folder, k, "x"), x, "x"))
    rec.update(write_part(part_path(folder, k, "label"), np.asarray(labels, np.int64), "label"))
    if captions is not None:
        data = json.dumps(list(captions), ensure_ascii=False, indent=0).encode()
        rec.update(write_part(captions_path(folder, k), data, "captions"))
    kill_hook("DMD_TEST_KILL_IN_SHARD", made)  # a crash after a shard's parts, before its record
    atomic_write_text(record_path(folder, k), json.dumps(rec, indent=1))


def is_real_folder(folder: Path) -> bool:
    try:
        return json.loads((Path(folder) / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_pixel_folder(folder, x: torch.Tensor, labels: torch.Tensor, source: dict, dtype: str = "float32",
                       shard_size: int = 1000) -> Path:
    """Writes images (N, C, H, W) in [-1, 1] with int64 labels (N,) as a "pixels" real-data folder. It is made
    aside and swapped in whole (engine/files.swap_in): a kill leaves the old folder or the new one, never a mix.
    A folder that is not a real-data folder is never replaced. One writer per folder at a time."""
    folder = Path(folder)
    x, labels = torch.as_tensor(x).detach().float().cpu(), torch.as_tensor(labels).cpu()
    if x.ndim != 4 or labels.shape != (len(x),) or labels.dtype != torch.int64:
        raise RealDataError(f"pixels must be (N, C, H, W) with int64 labels (N,); got {list(x.shape)} and "
                            f"{labels.dtype}{list(labels.shape)}")
    if not torch.isfinite(x).all() or x.abs().max() > 1:
        raise RealDataError("pixels must be finite and in [-1, 1]")
    if dtype not in STORAGE:
        raise RealDataError(f"dtype must be one of {', '.join(STORAGE)}, got '{dtype}'")
    recover_swapped(folder)
    if folder.exists() and any(folder.iterdir()) and not is_real_folder(folder):
        raise RealDataError(f"'{folder}' holds something other than a real-data folder; not replaced")
    expect = real_manifest("pixels", len(x), x.shape[1:], dtype, shard_size, source, captioned=False)
    fp, plan = fingerprint(expect), shard_plan(len(x), shard_size)
    for stale in folder.parent.glob(f".{folder.name}.tmp*"):  # left by a writer that was killed (one at a time)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    for k, (start, n) in enumerate(plan):
        write_shard(tmp, k, k + 1, {"fingerprint": fp, "start": start, "count": n},
                    encode(x[start:start + n], dtype), labels[start:start + n].numpy())
    write_manifest(tmp, expect, fp, plan, RealDataError)
    swap_in(tmp, folder)
    return folder


class RealReader:
    """Opens a real-data folder, checks it against what the run expects, and serves batches by row index."""

    def __init__(self, folder, expect: dict | None = None, verify: bool = True):
        """verify: check each shard against the manifest's sha256 (a process that reopens a folder another one
        has verified, e.g. DALI's worker, passes False)."""
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        man = self.manifest = read_manifest(self.folder, "real-data folder", RealDataError, expect, "make the real "
                                            "data for this run: engine/encode_real.py, examples/digits/make_real.py")
        if man.get("format") != FORMAT:
            raise RealDataError(f"{mpath}: not a real-data manifest (format is not '{FORMAT}')")
        self.verify = verify
        try:
            self.dtype, self.shape, self.kind = man["dtype"], tuple(man["shape"]), man["kind"]
            if self.dtype not in STORAGE or self.kind not in KINDS:
                raise KeyError("dtype" if self.dtype not in STORAGE else "kind")
            self.xs, labels, captions, self.starts = [], [], [], []
            for k, entry in enumerate(man["shards"]):
                n = entry["count"]
                self.starts.append(entry["start"])
                self.xs.append(self._open(entry, "x", (n, *self.shape), STORAGE[self.dtype]))
                labels.append(self._open(entry, "label", (n,), np.int64))
                if man["captioned"]:
                    captions += self._captions(entry, n)
        except (KeyError, TypeError) as e:
            raise RealDataError(f"{mpath}: not a real-data manifest (missing or malformed {e})") from None
        self.label = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.captions = captions if man["captioned"] else None
        if len(self.label) != man["count"]:
            raise RealDataError(f"{mpath}: shards hold {len(self.label)} rows but the manifest says {man['count']}")
        if self.starts != [int(s) for s in np.cumsum([0] + [len(a) for a in self.xs])[:-1]]:
            raise RealDataError(f"{mpath}: the shards' first rows {self.starts} do not follow one another")

    def _problem(self, path: Path, problem: str):
        return RealDataError(f"real-data shard '{path}' {problem}; make the folder again (engine/encode_real.py "
                             f"remakes the damaged shards and keeps the intact ones)")

    def _open(self, entry, part, want_shape, dtype):
        path = self.folder / entry[part]
        problem = part_problem(path, entry.get(part + "_bytes"), entry.get(part + "_sha256") if self.verify else None,
                               want_shape, dtype)
        if problem:
            raise self._problem(path, problem)
        return np.load(path, mmap_mode="r")

    def _captions(self, entry, n: int) -> list[str]:
        path = self.folder / entry["captions"]
        if not path.is_file():
            raise self._problem(path, "is missing")
        if self.verify and file_digest(path)["sha256"] != entry.get("captions_sha256"):
            raise self._problem(path, "does not match the manifest's checksum (changed after it was written)")
        caps = json.loads(path.read_text())
        if not isinstance(caps, list) or len(caps) != n or not all(isinstance(c, str) for c in caps):
            raise self._problem(path, f"does not hold {n} captions")
        return caps

    def __len__(self):
        return len(self.label)

    @property
    def parts(self) -> list[tuple[str, tuple, str]]:
        """(part, per-row shape, stored dtype) of raw_batch, for the DALI feed."""
        return [("x", self.shape, self.dtype), ("label", (), "int64")]

    def raw_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """x as stored (self.dtype) and labels: for a feed that converts them itself (the DALI feed)."""
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        x = np.empty((len(idx), *self.shape), STORAGE[self.dtype])
        for s in np.unique(shard):  # a batch gathers rows from each shard's memmap, never the whole data set
            rows = shard == s
            x[rows] = self.xs[s][idx[rows] - self.starts[s]]
        return x, np.ascontiguousarray(self.label[idx])

    def tensors(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """x as float32 and the int64 labels (caption indices for captioned data)."""
        x, label = self.raw_batch(indices)
        return torch.from_numpy(decode(x, self.dtype)), torch.from_numpy(label)

    def cond(self, label: torch.Tensor):
        """The condition of rows with these labels: the labels themselves, or (captioned) their captions."""
        return label if self.captions is None else [self.captions[i] for i in label.tolist()]

    def finish(self, parts: tuple) -> tuple:
        x, label = parts
        return x, self.cond(label)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor | list[str]]:
        x, label = self.tensors(indices)
        return x, self.cond(label)


def make_real_feed(loader: str, reader: RealReader, sampler, models):
    """data.loader for real data: .next() -> (x on models.device, cond), this process's slice of the batch that
    `sampler` (engine.pairs.BatchSampler) names; cond is int64 labels on the device, or a list of captions (DALI
    carries only their indices; the captions are looked up here, on the host). numpy and DALI give the same
    batches in the same order."""
    return make_feed(loader, reader, sampler, models, read=reader.tensors, parts=reader.parts, opener=RealReader,
                     finish=reader.finish)


def open_real(cfg, models):
    """(reader, batch sampler) of the run's real data for DMD2's discriminator, or Nones when
    train.gan_weight_fake is 0. The folder must hold pixels of the teacher's sample shape, or for latent models
    latents of that shape made by the teacher's own autoencoder (its weights hash and scaling factor)."""
    from .kinds import teacher_folder
    from .pairs import BatchSampler
    if cfg.train.gan_weight_fake <= 0:
        return None, None
    if models.text is None:
        expect = expected("pixels", models.sample_shape)
    else:
        vae = teacher_folder(cfg) / "vae"
        conf = json.loads((vae / "config.json").read_text())
        if "scaling_factor" not in conf:  # what diffusers gives the class when its config names none
            import diffusers
            cls = getattr(diffusers, conf.get("_class_name", "AutoencoderKL"))
            conf["scaling_factor"] = inspect.signature(cls.__init__).parameters["scaling_factor"].default
        expect = expected("latents", models.sample_shape, autoencoder_hash(vae), float(conf["scaling_factor"]))
    reader = RealReader(resolve_path(cfg.data.real_data), expect)
    if models.text is not None and reader.captions is None:
        raise RealDataError(f"data.real_data '{cfg.data.real_data}' holds no captions: a text-to-image "
                            f"discriminator needs each real latent's caption (engine/encode_real.py writes them)")
    if cfg.train.batch_size > len(reader):
        raise RealDataError(f"train.batch_size = {cfg.train.batch_size} is larger than the {len(reader)} samples "
                            f"in data.real_data '{cfg.data.real_data}'")
    return reader, BatchSampler(len(reader), cfg.train.batch_size, cfg.train.seed + 1)
