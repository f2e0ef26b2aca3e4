"""Triton kernels for the DMD hot path. Imports only torch and triton.

    kernels.noise   x_t = alpha[t_b] * x + sigma[t_b] * eps, schedule lookup and (optionally) Philox noise in-kernel
    kernels.dmd     the DMD gradient and loss (engine.losses.distribution_matching_loss) in one read of x and the
                    predictions per sample

Where they run: on CUDA tensors, and on CPU tensors only when TRITON_INTERPRET=1 was set before these modules were
imported (Triton's interpreter; slow, meant for tests); elsewhere they refuse. The engine chooses between them and
its eager reference (engine.losses, NoiseSchedule.add_noise) once, in engine/hotpath.py.
"""
from __future__ import annotations


def is_interpreted(kernel) -> bool:
    """True when @triton.jit produced an interpreter function (TRITON_INTERPRET=1 at decoration time).

    Asking the kernel itself, not the environment, because triton decides once, when the module is imported.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def runs_triton(kernel, *tensors) -> bool:
    """Whether `kernel` can run on these tensors: on CUDA always, on CPU only under the interpreter."""
    return all(t.is_cuda for t in tensors) or (is_interpreted(kernel) and all(t.device.type == "cpu" for t in tensors))
