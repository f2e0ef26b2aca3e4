"""Precomputed regression pairs (z, y = teacher_ODE(z)): a reader-neutral on-disk format.

A pairs folder holds plain .npy shards, so any reader (numpy, DALI's numpy reader, memmap) can use them:
    shard_00000.z.npy      (n, *shape)  float32   the unit noise the sampler started from
    shard_00000.y.npy      (n, *shape)  float32   the teacher's deterministic ODE output
    shard_00000.label.npy  (n,)         int64     class label, or prompt index (text models)
    manifest.json          teacher weights hash, sampler, steps, guidance, shapes, dtype, count, seeds, shards
                           (each with its size and sha256, checked when a reader opens the folder)
Pair i's noise is drawn from torch.Generator().manual_seed(seed + i), so any pair can be remade alone and
shards can be made in parallel anywhere. The manifest is written last: a folder without one is incomplete.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.samplers import nfe, sample

from .errors import PairsError
from .files import file_digest
from .text2image import condition_count

FORMAT = "dmd-pairs/1"
PARTS = ("z", "y", "label")


def noise_for(indices, shape, seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + int(i))) for i in indices])


def labels_for(indices, num_classes: int | None) -> torch.Tensor:
    return torch.as_tensor([int(i) % num_classes if num_classes else 0 for i in indices], dtype=torch.long)


def expected_manifest(teacher_hash: str, dc, shape, num_classes, text=None) -> dict:
    """The manifest fields that must match for a pairs folder to be usable with this teacher and config.
    Text models (engine.text2image.TextToImage): label i is prompt i, and the prompt list is pinned by hash."""
    man = {"format": FORMAT, "teacher_hash": teacher_hash, "sampler": dc.pair_sampler, "steps": dc.pair_steps,
           "nfe": nfe(dc.pair_sampler, dc.pair_steps), "guidance": dc.pair_guidance, "shape": list(shape),
           "dtype": "float32", "count": dc.num_pairs, "seed": dc.pair_seed, "num_classes": num_classes}
    if text is not None:
        man["prompts_hash"] = text.prompts_hash
    return man


def write_pairs(folder, teacher, teacher_hash: str, dc, progress: bool = True, text=None) -> Path:
    """Run the teacher's sampler on seeded noise and write shards + manifest.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    shape = tuple(teacher.sample_shape)
    num = condition_count(teacher, text)
    man = expected_manifest(teacher_hash, dc, shape, num, text)
    dev = next(itertools.chain(teacher.parameters(), teacher.buffers()), torch.empty(0)).device
    man["shards"] = []
    bar = tqdm(total=dc.num_pairs, desc=f"pairs ({dc.pair_sampler} x{dc.pair_steps})", disable=not progress,
               dynamic_ncols=True)
    for k, start in enumerate(range(0, dc.num_pairs, dc.shard_size)):
        idx = list(range(start, min(start + dc.shard_size, dc.num_pairs)))
        z, lab = noise_for(idx, shape, dc.pair_seed), labels_for(idx, num)
        ys = []
        for b in range(0, len(idx), dc.pair_batch_size):
            sl = slice(b, b + dc.pair_batch_size)
            cond = (text.embed(lab[sl]) if text is not None else lab[sl].to(dev)) if num else None
            ys.append(sample(teacher, z[sl].to(dev), cond, dc.pair_sampler, dc.pair_steps, dc.pair_guidance).cpu())
            bar.update(len(ys[-1]))
        arrays = {"z": z.numpy().astype(np.float32), "y": torch.cat(ys).numpy().astype(np.float32),
                  "label": lab.numpy().astype(np.int64)}
        entry = {"start": start, "count": len(idx)}
        for part, arr in arrays.items():
            name = f"shard_{k:05d}.{part}.npy"
            tmp = folder / f".{name}.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, folder / name)
            entry[part] = name
            digest = file_digest(folder / name)
            entry[part + "_bytes"], entry[part + "_sha256"] = digest["bytes"], digest["sha256"]
        man["shards"].append(entry)
    bar.close()
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(man, indent=2))
    os.replace(tmp, folder / "manifest.json")
    return folder


class PairReader:
    """Opens a pairs folder, checks it against what the run expects, and serves random batches."""

    def __init__(self, folder, expect: dict | None = None, verify: bool = True):
        """verify: check each shard against the manifest's sha256 (a process that reopens a folder another one
        has verified, e.g. DALI's worker, passes False)."""
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        if not mpath.is_file():
            raise PairsError(f"pairs folder '{self.folder}' has no manifest.json (missing or incomplete)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            raise PairsError(f"{mpath}: not valid JSON") from None
        for key, want in (expect or {}).items():
            have = self.manifest.get(key)
            if have != want:
                raise PairsError(f"{mpath}: '{key}' is {have!r} but this run expects {want!r} "
                                 f"(delete the folder to remake the pairs, or point data.pairs_dir elsewhere)")
        self.verify = verify
        arrays = {p: [] for p in PARTS}
        total = 0
        try:
            shape = tuple(self.manifest["shape"])
            for entry in self.manifest["shards"]:
                n = entry["count"]
                for part, want_shape, dtype in (("z", (n, *shape), np.float32), ("y", (n, *shape), np.float32),
                                                 ("label", (n,), np.int64)):
                    arrays[part].append(self._open(entry, part, want_shape, dtype))
                total += n
        except (KeyError, TypeError) as e:
            raise PairsError(f"{mpath}: not a pairs manifest (missing or malformed {e}); remake the pairs") from None
        if total != self.manifest["count"]:
            raise PairsError(f"{mpath}: shards hold {total} pairs but the manifest says {self.manifest['count']}")
        self.z, self.y, self.label = (np.concatenate(arrays[p]) for p in PARTS)

    def _open(self, entry, part, want_shape, dtype):
        path = self.folder / entry[part]
        if not path.is_file():
            raise PairsError(f"pair shard '{path}' is missing")
        size = path.stat().st_size
        if size != entry.get(part + "_bytes", size):
            raise PairsError(f"pair shard '{path}' is {size} bytes, the manifest says {entry[part + '_bytes']} "
                             f"(truncated or replaced)")
        if self.verify and part + "_sha256" in entry and file_digest(path)["sha256"] != entry[part + "_sha256"]:
            raise PairsError(f"pair shard '{path}' does not match the manifest's checksum (changed after it was "
                             f"written); delete the pairs folder to remake it")
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:  # numpy says 'mmap length is greater than file size' etc.
            raise PairsError(f"pair shard '{path}' cannot be read ({e})") from None
        if arr.shape != want_shape or arr.dtype != dtype:
            raise PairsError(f"pair shard '{path}' holds {arr.dtype}{list(arr.shape)}, expected "
                             f"{np.dtype(dtype)}{list(want_shape)}")
        return arr

    def __len__(self):
        return len(self.label)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices)
        return (torch.from_numpy(np.ascontiguousarray(self.z[idx])), torch.from_numpy(np.ascontiguousarray(self.y[idx])),
                torch.from_numpy(np.ascontiguousarray(self.label[idx])))


class BatchSampler:
    """Epoch-wise random permutation with an explicit position, so a resumed run continues the same order.
    Batch k is a pure function of k (`at`), so a prefetching loader can read ahead without moving the position."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise PairsError(f"train.reg_batch_size = {batch_size} is larger than the {n} pairs")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self, epoch=None):
        return np.random.default_rng(self.seed + (self.epoch if epoch is None else epoch)).permutation(self.n)

    @property
    def consumed(self) -> int:
        """Batches handed out so far (the index of the next one)."""
        return self.epoch * (self.n // self.bs) + self.pos // self.bs

    def at(self, k: int) -> np.ndarray:
        """Batch k of the stream `next` walks (each epoch drops its last n % batch_size pairs)."""
        epoch, j = divmod(k, self.n // self.bs)
        perm = self._perm if epoch == self.epoch else self._make_perm(epoch)
        return perm[j * self.bs: (j + 1) * self.bs]

    def next(self) -> np.ndarray:
        if self.pos + self.bs > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._make_perm()
        out = self._perm[self.pos: self.pos + self.bs]
        self.pos += self.bs
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._make_perm()
