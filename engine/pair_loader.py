"""Feeding the regression pairs to the trainer: this process's slice of each global batch, on its device.

    numpy  reads the batch from the shard memmaps when the step asks for it (no extra process)
    dali   an NVIDIA DALI pipeline: a worker process reads batches ahead from the memmaps (a parallel external
           source) and DALI moves them to the GPU, `depth` batches ahead, so the step never waits on disk or
           on a host-to-device copy. On the CPU (device_id=None) it runs the same pipeline without the copy.

Pairs stored in 16 bits (data.pair_dtype) travel as stored and become float32 at the end: numpy converts in
PairReader.batch; DALI converts inside its pipeline, after the copy to the GPU, so the copy moves half the bytes.

Both hand out the same batches in the same order: batch k is BatchSampler.at(k), a pure function of k, so
reading ahead never moves the position a checkpoint records (the batches consumed).

The feeds know a folder only by its parts (name, per-row shape, stored dtype) and a reader's raw_batch; the
real-data feed (engine/real_data.py) uses them with its own reader, parts and a last step on the host.
"""
from __future__ import annotations

import torch

from .backend import rank_slice
from .errors import DMDError
from .pairs import PARTS, BatchSampler, PairReader


def _same(parts):
    return parts


class NumpyFeed:
    """read(indices): the global batch's tensors (default: reader.batch); finish: what the step gets of this
    process's slices (default: them)."""

    def __init__(self, reader: PairReader, sampler, local, device, read=None, finish=_same):
        self.reader, self.sampler, self.local, self.device = reader, sampler, local, torch.device(device)
        self.read, self.finish = read or reader.batch, finish

    def next(self) -> tuple:
        return self.finish(tuple(self.local(a).to(self.device) for a in self.read(self.sampler.next())))

    def close(self):
        pass


class _ShardSource:
    """DALI's parallel external source: batch `first + info.iteration`, this rank's slice. Picklable (the
    worker process opens the folder itself with `opener`, a reader class), so the memmaps are never copied
    between processes."""

    def __init__(self, folder, sampler_args: tuple, first: int, rank: int, world: int, opener=PairReader):
        self.folder, self.sampler_args, self.first, self.rank, self.world = str(folder), sampler_args, first, rank, world
        self.opener, self.reader, self.sampler = opener, None, None

    def __call__(self, info):
        if self.reader is None:
            self.reader, self.sampler = self.opener(self.folder, verify=False), BatchSampler(*self.sampler_args)
        idx = rank_slice(self.sampler.at(self.first + info.iteration), self.rank, self.world)
        return self.reader.raw_batch(idx)  # dense (B, ...) arrays as stored: one batch each


def _to_float32(x, stored: str):
    """A DALI node of stored pair values as float32. DALI has no bfloat16: its 16 bits are the top half of a
    float32, so widen to uint32, shift them up (x 65536) and reinterpret the bits, exactly as numpy's path does."""
    from nvidia.dali import fn, types
    if stored == "bfloat16":
        return fn.reinterpret(fn.cast(x, dtype=types.UINT32) * types.Constant(65536, dtype=types.UINT32),
                              dtype=types.FLOAT)
    return x if stored == "float32" else fn.cast(x, dtype=types.FLOAT)


def pair_parts(reader: PairReader) -> list[tuple[str, tuple, str]]:
    """(part, per-row shape, stored dtype) of a pairs folder, in raw_batch's order."""
    shape = tuple(reader.manifest["shape"])
    return [(p, shape, reader.dtype) for p in PARTS[:2]] + [("label", (), "int64")]


class DaliFeed:
    """parts: what reader.raw_batch returns (default: the pairs'); opener: the reader class the worker opens the
    folder with; finish: as NumpyFeed's. Stored floats become float32 in the pipeline, int64 stays."""

    def __init__(self, reader: PairReader, sampler, rank: int, world: int, device, depth: int = 2, parts=None,
                 opener=PairReader, finish=_same):
        try:
            from nvidia.dali import fn, pipeline_def, types
        except ImportError:
            raise DMDError("data.loader 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130, or the "
                           "project's [gpu] extra)") from None
        self.sampler, self.device, self.finish = sampler, torch.device(device), finish
        self.parts = parts or pair_parts(reader)
        gpu = self.device.type == "cuda"
        source = _ShardSource(reader.folder, (sampler.n, sampler.bs, sampler.seed), sampler.consumed, rank, world,
                              opener)
        kinds = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.UINT16, "int64": types.INT64}

        @pipeline_def(batch_size=sampler.bs // world, num_threads=2, prefetch_queue_depth=depth, py_num_workers=1,
                      py_start_method="spawn", device_id=(self.device.index or 0) if gpu else None)
        def pipe():
            outs = fn.external_source(source=source, num_outputs=len(self.parts), batch=True, batch_info=True,
                                      parallel=True, dtype=[kinds[stored] for _, _, stored in self.parts])
            outs = [o.gpu() if gpu else o for o in outs]
            stored = [s for _, _, s in self.parts]
            return tuple(o if s == "int64" else _to_float32(o, s) for o, s in zip(outs, stored))

        self.pipe = pipe()
        self.pipe.build()

    def next(self) -> tuple:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        outs = self.pipe.run()
        self.sampler.next()  # the position a checkpoint stores: one more batch consumed
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        res = []
        for (_, shape, stored), tl in zip(self.parts, outs):
            t = torch.empty((len(tl), *shape), dtype=torch.int64 if stored == "int64" else torch.float32,
                            device=self.device)
            feed_ndarray(tl.as_tensor(), t, cuda_stream=stream)
            res.append(t)
        return self.finish(tuple(res))

    def close(self):
        del self.pipe


LOADERS = ("auto", "numpy", "dali")


def check_loader(choice: str):
    """Called before any work, so a typo costs nothing."""
    if choice not in LOADERS:
        raise DMDError(f"data.loader must be auto, numpy or dali, got '{choice}'")


def pick_loader(choice: str, device) -> str:
    """data.loader: auto = DALI on CUDA when it is installed, else numpy."""
    check_loader(choice)
    if choice == "auto":
        try:
            import nvidia.dali  # noqa: F401
            choice = "dali" if torch.device(device).type == "cuda" else "numpy"
        except ImportError:
            choice = "numpy"
    return choice


def make_feed(choice: str, reader, sampler, models, read=None, parts=None, opener=PairReader, finish=_same):
    """A feed of `reader`'s folder (pairs unless read/parts/opener say otherwise), the loader picked as
    pick_loader says."""
    if pick_loader(choice, models.device) == "numpy":
        return NumpyFeed(reader, sampler, models.local, models.device, read, finish)
    return DaliFeed(reader, sampler, models.rank, models.world_size, models.device, parts=parts, opener=opener,
                    finish=finish)


def make_pair_feed(choice: str, reader: PairReader, sampler, models):
    return make_feed(choice, reader, sampler, models)
