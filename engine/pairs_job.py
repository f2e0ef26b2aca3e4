"""Making the regression pairs: one job that any number of processes share and that a rerun continues.

Shard k holds pairs [k * shard_size, ...). It is a pure function of k (pair i's noise is seeded by i, and the
teacher always sees the same batches of the shard), so the bytes do not depend on how many processes made them
or which one made which shard. (On the CPU they do depend on torch's thread count, as float sums do: give every
run the same train.threads.)

    who makes what   every rank checks its share (k % world) of the shards already on disk; the ones to make are
                     then dealt out round-robin over the ranks, so shares stay equal (within one shard) on a rerun
                     too, and the only wait between ranks is one barrier after each rank's own share
    a shard          each part is written under a temporary name and renamed, then shard_00000.json, the shard's
                     commit record: each part's size and sha256 and the fingerprint of the expected manifest
                     (teacher, sampler, steps, dtype, count, seed...). A rerun keeps a shard only when its record
                     has this job's fingerprint and every part matches it (size, checksum, shape, dtype); anything
                     else (killed before its record, another config's shard, a flipped byte) is made again
    the manifest     written last, by rank 0, from the records, once every rank has passed the barrier
    progress         rank 0 shows one bar over the pairs this run makes on all ranks: its own pairs as each of its
                     batches finishes, another rank's shard when its record lands in the folder. The rate and ETA
                     are measured, not extrapolated; other ranks' progress shows a shard at a time, and the bar
                     stands still while rank 0 waits at the barrier for the last shards.
run_shards is this skeleton alone (lock, checks, share, errors, manifest): the real-data job
(engine/encode_real.py) runs on it too, with its own parts.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from models.samplers import nfe, sample

from .errors import PairsError
from .faults import kill_hook
from .files import FolderLock, atomic_write_text, file_digest
from .text2image import condition_count

FORMAT = "dmd-pairs/1"
PARTS = ("z", "y", "label")
# numpy has no bfloat16: it is stored as the top 16 bits of the float32 value (uint16)
STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
MISSING = "missing"


def noise_for(indices, shape, seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + int(i))) for i in indices])


def labels_for(indices, num_classes: int | None) -> torch.Tensor:
    return torch.as_tensor([int(i) % num_classes if num_classes else 0 for i in indices], dtype=torch.long)


def expected_manifest(teacher_hash: str, dc, shape, num_classes, text=None) -> dict:
    """The manifest fields that must match for a pairs folder to be usable with this teacher and config.
    Text models (engine.text2image.TextToImage): label i is prompt i, and the prompt list is pinned by hash."""
    man = {"format": FORMAT, "teacher_hash": teacher_hash, "sampler": dc.pair_sampler, "steps": dc.pair_steps,
           "nfe": nfe(dc.pair_sampler, dc.pair_steps), "guidance": dc.pair_guidance, "shape": list(shape),
           "dtype": dc.pair_dtype, "count": dc.num_pairs, "seed": dc.pair_seed, "num_classes": num_classes,
           "batch_size": dc.pair_batch_size}  # the teacher's batch shapes change its float sums
    if text is not None:
        man["prompts_hash"] = text.prompts_hash
    return man


def fingerprint(expect: dict) -> str:
    return hashlib.sha256(json.dumps(expect, sort_keys=True).encode()).hexdigest()


def encode(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 values as stored (pair_dtype); bfloat16 rounds to nearest even, as torch does."""
    x = x.detach().float().cpu()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def decode(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values back to float32 (exact: every stored value is a float32 value)."""
    if dtype == "bfloat16":
        return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a).astype(np.float32, copy=False)


def shard_plan(count: int, shard_size: int) -> list[tuple[int, int]]:
    """(first pair, pairs) of each shard."""
    return [(s, min(shard_size, count - s)) for s in range(0, count, shard_size)]


def part_path(folder: Path, k: int, part: str) -> Path:
    return Path(folder) / f"shard_{k:05d}.{part}.npy"


def record_path(folder: Path, k: int) -> Path:
    return Path(folder) / f"shard_{k:05d}.json"


def part_problem(path: Path, want_bytes, want_sha, want_shape, dtype, record: str = "manifest") -> str | None:
    """What is wrong with the .npy file at `path` for what `record` says of it (None: nothing; a None size or
    checksum is not checked)."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if want_bytes is not None and size != want_bytes:
        return f"is {size} bytes, the {record} says {want_bytes} (truncated or replaced)"
    if want_sha is not None and file_digest(path)["sha256"] != want_sha:
        return f"does not match the {record}'s checksum (changed after it was written)"
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy says 'mmap length is greater than file size' etc.
        return f"cannot be read ({e})"
    if arr.shape != tuple(want_shape) or arr.dtype != dtype:
        return f"holds {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}{list(want_shape)}"
    return None


def _wants(expect: dict, n: int):
    """(part, shape, on-disk dtype) of a shard of n pairs."""
    shape = (n, *expect["shape"])
    return (("z", shape, STORAGE[expect["dtype"]]), ("y", shape, STORAGE[expect["dtype"]]),
            ("label", (n,), np.dtype(np.int64)))


def shard_problem(folder: Path, k: int, start: int, n: int, expect: dict, fp: str, wants=None) -> str | None:
    """Why shard k cannot be kept as pairs [start, start + n) of this job (None: it can). `wants`: the shard's
    .npy parts as (part, shape, on-disk dtype), for jobs other than pairs (default: the pairs' z, y, label)."""
    wants = _wants(expect, n) if wants is None else wants
    rec_path = record_path(folder, k)
    if not rec_path.is_file():
        started = any(part_path(folder, k, p).exists() for p, _, _ in wants)
        return "killed before it was complete" if started else MISSING
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return f"{rec_path.name} is unreadable"
    if not isinstance(rec, dict) or rec.get("fingerprint") != fp:
        return "made for another teacher or config"
    if (rec.get("start"), rec.get("count")) != (start, n):
        return f"{rec_path.name} says pairs {rec.get('start')}+{rec.get('count')}, expected {start}+{n}"
    for part, shape, dtype in wants:
        path = part_path(folder, k, part)
        problem = part_problem(path, rec.get(f"{part}_bytes"), rec.get(f"{part}_sha256"), shape, dtype, "record")
        if problem or rec.get(part) != path.name:
            return f"{path.name} {problem or 'is not the one recorded'}"
    return None


def write_part(path: Path, arr: np.ndarray | bytes, part: str) -> dict:
    """Writes an array as .npy (or bytes as they are) atomically; returns what a record says of the file."""
    if isinstance(arr, bytes):
        data = arr
    else:
        buf = io.BytesIO()
        np.save(buf, arr)
        data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader sees the old file or the whole new one
    return {part: path.name, f"{part}_bytes": len(data), f"{part}_sha256": hashlib.sha256(data).hexdigest()}


class Solo:
    """One process alone, seen as a group (what a backend offers: rank, world_size, barrier, gather)."""
    rank, world_size = 0, 1

    def barrier(self):
        pass

    def gather(self, obj) -> list:
        return [obj]


class _Progress:
    """Rank 0's bar (see the module doc); a no-op elsewhere."""

    def __init__(self, folder, plan, missing, todo, enabled: bool, desc: str):
        self.folder, mine = folder, set(todo)
        self.others = {k: plan[k][1] for k in missing if k not in mine} if enabled else {}
        self.bar = tqdm(total=sum(plan[k][1] for k in missing), desc=desc, disable=not enabled, dynamic_ncols=True)

    def add(self, n: int):
        self.bar.update(n)
        landed = [k for k in self.others if record_path(self.folder, k).is_file()]
        self.bar.update(sum(self.others.pop(k) for k in landed))

    def close(self, done: bool = True):
        if done:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _shorten(ks: list[int], most: int = 10) -> str:
    return ", ".join(map(str, ks[:most])) + (f", ... ({len(ks)} in all)" if len(ks) > most else "")


@dataclass
class ShardJob:
    """A sharded job as run_shards sees it: the pairs job, or another one built on the same folder rules."""
    name: str                   # message prefix, lock file (".{name}.lock")
    expect: dict                # the manifest's fields; the records' fingerprint is their hash
    plan: list                  # (first row, rows) of each shard
    problem: Callable           # shard k -> why it cannot be kept (None: it can; MISSING: nothing there)
    make: Callable              # (shard ids, progress bar) -> None: makes each shard, its record last
    desc: str                   # the progress bar's label
    error: type = PairsError


def write_pairs(folder, teacher, teacher_hash: str, dc, progress: bool = True, text=None, group=None) -> Path:
    """Makes the shards of `folder` that are missing or not intact, then manifest.json. Every process of `group`
    (a backend, or anything with rank, world_size, barrier() and gather(); None: this process alone) calls it
    with a whole teacher; each makes only its own share."""
    folder = Path(folder)
    shape, num = tuple(teacher.sample_shape), condition_count(teacher, text)
    expect = expected_manifest(teacher_hash, dc, shape, num, text)
    fp, plan = fingerprint(expect), shard_plan(dc.num_pairs, dc.shard_size)
    dev = next(itertools.chain(teacher.parameters(), teacher.buffers()), torch.empty(0)).device
    job = ShardJob("pairs", expect, plan, lambda k: shard_problem(folder, k, *plan[k], expect, fp),
                   lambda todo, bar: _make_shards(folder, teacher, dc, text, todo, plan, shape, num, fp, dev, bar),
                   f"pairs ({dc.pair_sampler} x{dc.pair_steps})")
    return run_shards(folder, job, group, progress)


def run_shards(folder, job: ShardJob, group=None, progress: bool = True) -> Path:
    """Runs `job` in `folder` as the module doc says: one job per folder (a lock), each rank's share checked and
    the shards to make dealt out, errors reported on every rank, the manifest written last by rank 0."""
    group = group or Solo()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder / f".{job.name}.lock", f"{job.name} job") if group.rank == 0 else None
    refused = [r for r in group.gather(lock.take() if lock else None) if r]
    if refused:
        raise job.error(refused[0])
    try:
        return _make(folder, job, group, progress)
    finally:
        if lock:
            lock.release()


def _make(folder, job: ShardJob, group, progress) -> Path:
    rank, world, plan, name = group.rank, group.world_size, job.plan, job.name
    if rank == 0:  # no rank writes before the gather below, so nothing here is another rank's work in progress
        (folder / "manifest.json").unlink(missing_ok=True)
        for tmp in itertools.chain(folder.glob(".shard_*.tmp*"), folder.glob(".manifest.json.tmp*")):
            tmp.unlink(missing_ok=True)
    redo = []
    for k in range(rank, len(plan), world):
        problem = job.problem(k)
        if problem:
            record_path(folder, k).unlink(missing_ok=True)  # so that it counts as made only once made again
            redo.append(k)
            if problem != MISSING:
                print(f"{name}: shard {k} is made again: {problem}", flush=True)
    missing = sorted(itertools.chain.from_iterable(group.gather(redo)))
    todo = missing[rank::world]
    if rank == 0:
        print(f"{name}: {len(plan) - len(missing)} of {len(plan)} shards complete, {len(missing)} to make on "
              f"{world} process(es)", flush=True)
    bar = _Progress(folder, plan, missing, todo, progress and rank == 0, job.desc)
    try:
        job.make(todo, bar)
    except Exception as e:  # noqa: BLE001 - reported on every rank below, not left for a barrier to time out
        error = f"{name}: rank {rank} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    else:
        error = None
    errors = [e for e in group.gather(error) if e]  # the only wait between ranks: every rank's share is done
    if errors:
        bar.close(done=False)
        raise job.error(errors[0])
    if todo:
        print(f"{name}: rank {rank} made {len(todo)} shard(s): {_shorten(todo)}", flush=True)
    bar.close()
    if rank == 0:
        write_manifest(folder, job.expect, fingerprint(job.expect), plan, job.error)
    group.barrier()  # no rank reads the folder before its manifest exists
    return folder


def _make_shards(folder, teacher, dc, text, todo, plan, shape, num, fp, dev, bar):
    for made, k in enumerate(todo, 1):
        start, n = plan[k]
        idx = list(range(start, start + n))
        z, lab = noise_for(idx, shape, dc.pair_seed), labels_for(idx, num)
        z = torch.from_numpy(decode(encode(z, dc.pair_dtype), dc.pair_dtype))  # y starts from the z that is stored
        ys = []
        for b in range(0, n, dc.pair_batch_size):
            sl = slice(b, b + dc.pair_batch_size)
            cond = (text.embed(lab[sl]) if text is not None else lab[sl].to(dev)) if num else None
            ys.append(sample(teacher, z[sl].to(dev), cond, dc.pair_sampler, dc.pair_steps, dc.pair_guidance).cpu())
            bar.add(len(ys[-1]))
        rec = {"fingerprint": fp, "start": start, "count": n}
        for part, arr in (("z", encode(z, dc.pair_dtype)), ("y", encode(torch.cat(ys), dc.pair_dtype)),
                          ("label", lab.numpy().astype(np.int64))):
            rec.update(write_part(part_path(folder, k, part), arr, part))
        kill_hook("DMD_TEST_KILL_IN_SHARD", made)  # a crash after a shard's parts, before its record
        atomic_write_text(record_path(folder, k), json.dumps(rec, indent=1))


def write_manifest(folder: Path, expect: dict, fp: str, plan, error: type = PairsError):
    man = {**expect, "shards": []}
    for k, (start, n) in enumerate(plan):
        try:
            rec = json.loads(record_path(folder, k).read_text())
        except (OSError, ValueError):
            rec = {}
        if rec.get("fingerprint") != fp or (rec.get("start"), rec.get("count")) != (start, n):
            raise error(f"{record_path(folder, k)}: shard {k} was not made (or replaced meanwhile); run again")
        man["shards"].append({key: v for key, v in rec.items() if key != "fingerprint"})
    atomic_write_text(folder / "manifest.json", json.dumps(man, indent=2))
