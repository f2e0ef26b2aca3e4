"""Device and dtype choices shared by the entry points: "auto" means a GPU when torch sees one."""
from __future__ import annotations

import torch

from .errors import DMDError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(choice: str, key: str = "--device") -> torch.device:
    """auto = the first CUDA device when there is one, else the CPU; cuda[:N] is refused without a GPU."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cuda", "cpu") and not (choice.startswith("cuda:") and choice[5:].isdigit()):
        raise DMDError(f"{key} must be auto, cuda, cuda:N or cpu, got '{choice}'")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DMDError(f"{key} is '{choice}' but torch sees no CUDA device (use auto or cpu)")
        if ":" in choice and int(choice[5:]) >= torch.cuda.device_count():
            raise DMDError(f"{key} is '{choice}' but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(choice)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """Sampling precision: auto = float16 on a GPU (Stable Diffusion's usual inference dtype), float32 on the
    CPU (where half precision is slow and gains nothing)."""
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if choice not in DTYPES:
        raise DMDError(f"--dtype must be auto, {', '.join(DTYPES)}, got '{choice}'")
    return DTYPES[choice]
