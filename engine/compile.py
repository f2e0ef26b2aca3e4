"""torch.compile for the generator's forward and backward (config: train.compile, train.compile_mode), and with
train.compile_scope = "all" for the teacher's and the fake score's networks too.

Compilation is lazy in torch: torch.compile() itself rarely fails, the first call does (no C compiler for CPU
inductor, an unsupported op, an old GPU for Triton). So the first call probes forward *and* backward on the real
inputs, without touching .grad, and on any failure the wrapper warns once and stays eager for good; a run never
dies because compilation is unavailable. Mode "auto" picks "reduce-overhead" on CUDA, which adds CUDA graphs when
shapes are fixed (the generator's are: batch_size and reg_batch_size per process, or train.micro_batch_size and a
shorter last micro-batch: one more graph), and "default" elsewhere.

The teacher and the fake score are compiled without CUDA graphs (mode "default", or max-autotune without graphs):
each is called several times a step, with and without gradients and, under guidance, on a doubled batch, and
CUDA graphs reuse a graph's output memory on its next replay.

Not covered: a failure that first shows in a later backward (after a successful probe) still raises. With dropout
in the generator, compiled and eager runs draw different dropout masks (inductor has its own RNG, and the probe
draws once more), so they agree in distribution, not bit for bit.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import root_cause


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"train.compile_mode must be auto, default, reduce-overhead, max-autotune or "
                         f"max-autotune-no-cudagraphs, got '{mode}'")
    return mode


def build_device_tables(module: nn.Module, device):
    """Builds, eagerly, the lookup tables `module`'s parts cache per device (the noise schedule's): built inside
    the first compiled call they would be outputs of a CUDA graph, overwritten by its next replay."""
    for sub in module.modules():
        tables = getattr(getattr(sub, "schedule", None), "tables", None)
        if callable(tables):
            tables(device)


class CompiledModule:
    """Calls `module` through torch.compile, or eagerly after a warning when compilation fails.

    `module` itself stays the owner of the parameters (optimisers, state_dict and EMA keep using it).
    """

    def __init__(self, module: nn.Module, mode: str = "auto", device=None, backend="inductor", name="generator"):
        self.module, self.name = module, name
        device = torch.device(device) if device is not None else next(module.parameters()).device
        self.mode = resolve_mode(mode, device)
        self.cuda_graphs = device.type == "cuda" and self.mode in ("reduce-overhead", "max-autotune")
        self.error: str | None = None
        self._probed: set = set()  # input signatures whose backward compiled fine
        param = next(module.parameters(), None)
        build_device_tables(module, param.device if param is not None else device)
        try:
            self.compiled = torch.compile(module, mode=self.mode if backend == "inductor" else None,
                                          backend=backend, dynamic=False)
        except Exception as e:  # noqa: BLE001 - any failure means "run eagerly", reported below
            self._fail(e)

    @property
    def active(self) -> bool:
        return self.error is None

    def _fail(self, e: BaseException):
        root = root_cause(e)
        lines = str(root).strip().splitlines()
        self.error = type(e).__name__ + (f" ({type(root).__name__}: {lines[0]})" if root is not e else
                                         f": {lines[0] if lines else ''}")
        self.compiled = None
        warnings.warn(f"torch.compile of the {self.name} failed, training continues eagerly ({self.error})",
                      RuntimeWarning, stacklevel=3)

    def step_begin(self):
        """Marks a new training iteration, so CUDA graphs may reuse the previous iteration's output memory."""
        if self.compiled is not None and self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _probe(self, args, kwargs):
        params = [p for p in self.module.parameters() if p.requires_grad]
        out = self.compiled(*args, **kwargs)
        out = getattr(out, "sample", out)  # a diffusers network returns an output dataclass
        if params and out.requires_grad:
            torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                # each new input shape is a new graph, and its backward compiles only at backward time
                key = tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else a for a in args)
                if key not in self._probed and torch.is_grad_enabled():
                    self._probe(args, kwargs)
                    self._probed.add(key)
                    self.step_begin()
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        return self.module(*args, **kwargs)


def compile_denoiser_net(denoiser: nn.Module, name: str, mode: str, device) -> CompiledModule:
    """Routes `denoiser`'s network calls through a CompiledModule without CUDA graphs (see the module doc).
    Set after every copy of the denoiser is made: the hook is a plain attribute, not a submodule."""
    mode = "max-autotune-no-cudagraphs" if resolve_mode(mode, torch.device(device)) == "max-autotune" else "default"
    denoiser.net_call = CompiledModule(denoiser.net, mode, device, name=name)
    return denoiser.net_call
