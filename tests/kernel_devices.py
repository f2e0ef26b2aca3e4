"""What the Triton test files share: the interpreter switched on before kernels.* is imported (triton.jit picks
the interpreter when a kernel module is imported; torch itself does not import triton), and the devices the kernel
paths run on (CPU through the interpreter, CUDA when there is one)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from kernels import dmd, runs_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not runs_triton(dmd._dmd_stats_kernel, torch.empty(0)),
                                                 reason="kernels were imported without TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]
