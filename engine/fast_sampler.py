"""The fixed-shape generator sampler: unit noise and a condition in, uint8 images out, as one callable.

A multi-step generator (models/denoiser.OneStepGenerator with several timesteps) is still one call: its noise
input holds every step's draw, stacked on the channel axis (`noise_shape`), so nothing below is per step and
padding, compilation and CUDA graphs cover all K steps at once.

One path, `SamplePath`: (token ids -> text encoder ->) generator -> (latent decoder ->) uint8 N×H×W×C, run on
the device in the sampler's dtype. `OneStepSampler` runs it over requests of any size:

- requests are cut into batches of at most `max_batch` and each batch padded up to its bucket, the next power
  of two (or max_batch), so only a handful of shapes ever run: each is compiled (torch.compile, static shapes)
  and, on CUDA, captured as a CUDA graph with static input buffers the first time it is met (warm-up on
  first use);
- a failed compile or capture prints one line and that stage is dropped for good (eager, or compiled without
  graphs), so sampling never dies because compilation is unavailable.

infer.py, training's sample grids (eager) and bench/latency.py all sample through it.
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from .compile import build_device_tables
from .errors import root_cause
from .sampling import uint8_images


class SamplePath(nn.Module):
    """z (B, *noise shape: K*C channels for a K-step generator) and cond (class labels (B,), token ids (B, L)
    for text models, or None) -> images uint8 (B, H, W, C); models whose samples are not images (the 2-D toy)
    return their float samples."""

    def __init__(self, generator: nn.Module, text_encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.generator, self.text_encoder, self.decoder = generator, text_encoder, decoder

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.text_encoder is not None:
            cond = self.text_encoder(cond).last_hidden_state
        x = self.generator(z, cond)
        if self.decoder is not None:
            x = self.decoder(x)
        return uint8_images(x) if x.ndim == 4 else x.float()


def buckets(max_batch: int) -> list[int]:
    """The batch sizes that run: powers of two below max_batch, and max_batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def _first_line(e: BaseException) -> str:
    root = root_cause(e)
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0][:200] if lines else ''}"


class OneStepSampler:
    """sampler(z, cond) -> CPU tensor of images (uint8 N×H×W×C) for any N; see the module doc.

    z: unit noise (N, *noise_shape) on any device; cond: class labels (N,) or token ids (N, L) or None.
    compile: torch.compile the path; cuda_graphs: capture each bucket (default: on when the device is CUDA).
    dtype: the sampler owns the path's networks: moved to `device`, frozen, floats cast to dtype. None: the
    networks are used as they are (training's grids sample the models being trained, in eval mode there).
    """

    def __init__(self, path: SamplePath, device="cpu", dtype: torch.dtype | None = torch.float32,
                 compile: bool = True, cuda_graphs: bool | None = None, max_batch: int = 16,
                 compile_mode: str = "default"):
        self.device, self.dtype = torch.device(device), dtype
        self.path = path
        if dtype is not None:
            path.to(self.device).eval().requires_grad_(False)
            self._cast_floats(dtype)
        self.max_batch = int(max_batch)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        build_device_tables(self.path, self.device)  # before any capture, as engine/compile.py does
        if compile and self.device.type == "cpu":  # inductor's C++ path warns that no CUDA is installed
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        if compile:  # each bucket is one static-shape graph: let dynamo keep all of them, not fall back at 8
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, len(buckets(self.max_batch)) + 4)
        self.compiled = torch.compile(self.path, mode=compile_mode, dynamic=False) if compile else None
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, static z, static cond, static out)
        self._pool = None  # the CUDA graph memory pool all buckets share
        self.ready: set[int] = set()  # buckets already warmed up
        self.notes: list[str] = []  # the one-line fallbacks taken, for printouts and benchmarks

    def _cast_floats(self, dtype):
        """Floating parameters and buffers to `dtype`; integer buffers (token positions) stay as they are."""
        for t in list(self.path.parameters()) + list(self.path.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)

    @property
    def mode(self) -> str:
        return ("compiled" if self.compiled is not None else "eager") + (" + CUDA graphs" if self.cuda_graphs else "")

    def _note(self, msg: str):
        self.notes.append(msg)
        print(f"warning: {msg}", file=sys.stderr)

    # --- the stages -------------------------------------------------------------------------------
    def _fn(self, z, cond):
        if self.compiled is not None:
            try:
                return self.compiled(z, cond)
            except Exception as e:  # noqa: BLE001 - any compile failure means "run eagerly", said once
                self.compiled = None
                self._note(f"torch.compile failed, sampling eagerly ({_first_line(e)})")
        return self.path(z, cond)

    def _capture(self, b: int, z, cond):
        """Warms bucket b up on a side stream (compiling it), then records one call as a CUDA graph. Every
        bucket's graph allocates from one shared pool: safe here because each replay's output is copied to the
        host before the next replay, and it keeps the graphs' memory to about the largest one's."""
        sz, sc = z.clone(), cond.clone() if cond is not None else None  # static inputs, outside the pool
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # the first call compiles (or falls back, said once); the second runs as captured
                self._fn(sz, sc)
        torch.cuda.current_stream(self.device).wait_stream(side)
        fn = self.compiled if self.compiled is not None else self.path  # no compile fallback inside a capture
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn(sz, sc)
        except Exception as e:  # noqa: BLE001 - a host sync or an allocation the capture cannot take
            self.cuda_graphs = False
            self.graphs.clear()
            self._note(f"CUDA graph capture failed, running without graphs ({_first_line(e)})")
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001 - the failed capture's error is the one reported
                pass
            return None
        self.graphs[b] = (graph, sz, sc, out)
        return self.graphs[b]

    @torch.no_grad()
    def _run_bucket(self, b: int, z, cond) -> torch.Tensor:
        if self.cuda_graphs:
            with torch.cuda.device(self.device):  # capture and replay on the sampler's GPU, not the current one
                entry = self.graphs.get(b) or self._capture(b, z, cond)
                if entry is not None:
                    graph, sz, sc, out = entry
                    sz.copy_(z)
                    if sc is not None:
                        sc.copy_(cond)
                    graph.replay()
                    return out
        return self._fn(z, cond)

    # --- requests -------------------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        """The batch size a request of n runs at: the smallest warmed-up one that holds it (padding costs less
        than compiling and capturing one more shape), else the smallest bucket that holds it."""
        ready = [b for b in sorted(self.ready) if b >= n]
        return ready[0] if ready else next(b for b in buckets(self.max_batch) if b >= n)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = []
        for i in range(0, len(z), self.max_batch):
            zi = z[i: i + self.max_batch]
            ci = cond[i: i + self.max_batch] if cond is not None else None
            n = len(zi)
            b = self.bucket(n) if self.compiled is not None or self.cuda_graphs else n  # eager runs any shape
            zi = zi.to(self.device, self.dtype or zi.dtype)
            ci = ci.to(self.device) if ci is not None else None
            if b > n:  # pad to the bucket: zero noise, the first condition repeated; the extra rows are cut
                zi = torch.cat([zi, zi.new_zeros((b - n, *zi.shape[1:]))])
                ci = torch.cat([ci, ci[:1].expand(b - n, *ci.shape[1:])]) if ci is not None else None
            self.ready.add(b)
            out.append(self._run_bucket(b, zi, ci)[:n].cpu())
        return torch.cat(out)
