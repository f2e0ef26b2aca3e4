"""Feeding the regression pairs to the trainer: this process's slice of each global batch, on its device.

    numpy  reads the batch from the shard memmaps when the step asks for it (no extra process)
    dali   an NVIDIA DALI pipeline: a worker process reads batches ahead from the memmaps (a parallel external
           source) and DALI moves them to the GPU, `depth` batches ahead, so the step never waits on disk or
           on a host-to-device copy. On the CPU (device_id=None) it runs the same pipeline without the copy.

Pairs stored in 16 bits (data.pair_dtype) travel as stored and become float32 at the end: numpy converts in
PairReader.batch; DALI converts inside its pipeline, after the copy to the GPU, so the copy moves half the bytes.

Both hand out the same batches in the same order: batch k is BatchSampler.at(k), a pure function of k, so
reading ahead never moves the position a checkpoint records (the batches consumed).
"""
from __future__ import annotations

import torch

from .backend import rank_slice
from .errors import DMDError
from .pairs import PARTS, BatchSampler, PairReader


class NumpyFeed:
    def __init__(self, reader: PairReader, sampler, local, device):
        self.reader, self.sampler, self.local, self.device = reader, sampler, local, torch.device(device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.local(a).to(self.device) for a in self.reader.batch(self.sampler.next()))

    def close(self):
        pass


class _ShardSource:
    """DALI's parallel external source: batch `first + info.iteration`, this rank's slice. Picklable (the
    worker process opens the pairs folder itself), so the memmaps are never copied between processes."""

    def __init__(self, folder, sampler_args: tuple, first: int, rank: int, world: int):
        self.folder, self.sampler_args, self.first, self.rank, self.world = str(folder), sampler_args, first, rank, world
        self.reader = self.sampler = None

    def __call__(self, info):
        if self.reader is None:
            self.reader, self.sampler = PairReader(self.folder, verify=False), BatchSampler(*self.sampler_args)
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


class DaliFeed:
    def __init__(self, reader: PairReader, sampler, rank: int, world: int, device, depth: int = 2):
        try:
            from nvidia.dali import fn, pipeline_def, types
        except ImportError:
            raise DMDError("data.loader 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130, or the "
                           "project's [gpu] extra)") from None
        self.sampler, self.device = sampler, torch.device(device)
        gpu = self.device.type == "cuda"
        source = _ShardSource(reader.folder, (sampler.n, sampler.bs, sampler.seed), sampler.consumed, rank, world)
        stored = reader.dtype
        kind = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.UINT16}[stored]

        @pipeline_def(batch_size=sampler.bs // world, num_threads=2, prefetch_queue_depth=depth, py_num_workers=1,
                      py_start_method="spawn", device_id=(self.device.index or 0) if gpu else None)
        def pipe():
            outs = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True, parallel=True,
                                      dtype=[kind, kind, types.INT64])
            z, y, label = (o.gpu() if gpu else o for o in outs)
            return _to_float32(z, stored), _to_float32(y, stored), label

        self.pipe = pipe()
        self.pipe.build()
        shape = tuple(reader.manifest["shape"])
        self.shapes = {"z": shape, "y": shape, "label": ()}

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        outs = self.pipe.run()
        self.sampler.next()  # the position a checkpoint stores: one more batch consumed
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        res = []
        for part, tl in zip(PARTS, outs):
            t = torch.empty((len(tl), *self.shapes[part]), dtype=torch.int64 if part == "label" else torch.float32,
                            device=self.device)
            feed_ndarray(tl.as_tensor(), t, cuda_stream=stream)
            res.append(t)
        return tuple(res)

    def close(self):
        del self.pipe


LOADERS = ("auto", "numpy", "dali")


def check_loader(choice: str):
    """Called before any work, so a typo costs nothing."""
    if choice not in LOADERS:
        raise DMDError(f"data.loader must be auto, numpy or dali, got '{choice}'")


def make_pair_feed(choice: str, reader: PairReader, sampler, models):
    """data.loader: auto = DALI on CUDA when it is installed, else numpy."""
    check_loader(choice)
    if choice == "auto":
        try:
            import nvidia.dali  # noqa: F401
            choice = "dali" if models.device.type == "cuda" else "numpy"
        except ImportError:
            choice = "numpy"
    if choice == "numpy":
        return NumpyFeed(reader, sampler, models.local, models.device)
    return DaliFeed(reader, sampler, models.rank, models.world_size, models.device)
