"""Precomputed regression pairs (z, y = teacher_ODE(z)): a reader-neutral on-disk format.

A pairs folder holds plain .npy shards, so any reader (numpy, DALI's numpy reader, memmap) can use them:
    shard_00000.z.npy      (n, *shape)  pair_dtype  the unit noise the sampler started from
    shard_00000.y.npy      (n, *shape)  pair_dtype  the teacher's deterministic ODE output
    shard_00000.label.npy  (n,)         int64       class label, or prompt index (text models)
    shard_00000.json       the shard's record: its parts' sizes and sha256, and which job made it
    manifest.json          teacher weights hash, sampler, steps, guidance, shapes, dtype, count, seeds, shards
                           (each with its size and sha256, checked when a reader opens the folder)
pair_dtype (data.pair_dtype, the manifest's "dtype"): float32, float16, or bfloat16 stored as uint16 (the top
16 bits of the float32 value; numpy has no bfloat16); readers get float32 back either way.
Pair i's noise is drawn from torch.Generator().manual_seed(seed + i), so any pair can be remade alone and
shards can be made in parallel anywhere: engine/pairs_job.py makes them, on one process or many, and continues
a job that was killed. The manifest is written last: a folder without one is incomplete.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import PairsError
from .files import read_manifest
from .pairs_job import (FORMAT, PARTS, STORAGE, decode, expected_manifest, labels_for, noise_for,  # noqa: F401
                        part_problem, write_pairs)


class PairReader:
    """Opens a pairs folder, checks it against what the run expects, and serves random batches."""

    def __init__(self, folder, expect: dict | None = None, verify: bool = True):
        """verify: check each shard against the manifest's sha256 (a process that reopens a folder another one
        has verified, e.g. DALI's worker, passes False)."""
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        self.manifest = read_manifest(self.folder, "pairs folder", PairsError, expect, "delete the folder to remake "
                                      "the pairs, or point data.pairs_dir elsewhere")
        self.verify = verify
        self.dtype = self.manifest.get("dtype", "float32")
        if self.dtype not in STORAGE:
            raise PairsError(f"{mpath}: unknown pair dtype {self.dtype!r} (expected one of {', '.join(STORAGE)})")
        arrays = {p: [] for p in PARTS}
        total = 0
        try:
            shape, stored = tuple(self.manifest["shape"]), STORAGE[self.dtype]
            for entry in self.manifest["shards"]:
                n = entry["count"]
                for part, want_shape, dtype in (("z", (n, *shape), stored), ("y", (n, *shape), stored),
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
        problem = part_problem(path, entry.get(part + "_bytes"), entry.get(part + "_sha256") if self.verify else None,
                               want_shape, dtype)
        if problem:
            raise PairsError(f"pair shard '{path}' {problem}; engine/make_pairs.py --overwrite remakes the damaged "
                             f"shards and keeps the intact ones")
        return np.load(path, mmap_mode="r")

    def __len__(self):
        return len(self.label)

    def raw_batch(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """z, y as stored (self.dtype) and labels: for a feed that converts them itself (the DALI feed)."""
        idx = np.asarray(indices)
        return tuple(np.ascontiguousarray(a[idx]) for a in (self.z, self.y, self.label))

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, y, label = self.raw_batch(indices)
        return (torch.from_numpy(decode(z, self.dtype)), torch.from_numpy(decode(y, self.dtype)),
                torch.from_numpy(label))


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
