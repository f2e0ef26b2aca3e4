"""Which attention kernels the diffusers networks run, decided here for every caller.

    sdpa      PyTorch's scaled_dot_product_attention (diffusers' default processor; flash / memory-efficient
              kernels on CUDA, the math kernel on CPU)
    xformers  xformers' memory-efficient attention, when installed with a CUDA build and asked for
"""
from __future__ import annotations

from torch import nn

KINDS = ("sdpa", "xformers")


class AttentionError(ValueError):
    """The asked-for attention cannot be used here (not installed, no GPU build)."""


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - missing, or a build that does not load
        return False


def attention_layers(modules: list[nn.Module]) -> list[nn.Module]:
    """diffusers' Attention layers anywhere inside `modules` (UNet2DModel has no model-level setter, so the
    choice is made layer by layer, which covers every diffusers model alike)."""
    from diffusers.models.attention_processor import Attention
    return [m for root in modules if root is not None for m in root.modules() if isinstance(m, Attention)]


def use_attention(modules: list[nn.Module], kind: str = "sdpa") -> str:
    """Sets `kind` on every diffusers attention layer in `modules`, at any depth; returns the kind set.
    transformers' text encoders keep their own choice (SDPA by default)."""
    if kind not in KINDS:
        raise AttentionError(f"attention must be one of {', '.join(KINDS)}, got '{kind}'")
    if kind == "xformers" and not xformers_available():
        raise AttentionError("attention 'xformers' asked for, but xformers is not installed (pip install xformers)")
    from diffusers.models.attention_processor import AttnProcessor2_0
    for m in attention_layers(modules):
        if kind == "xformers":
            try:
                m.set_use_memory_efficient_attention_xformers(True)
            except Exception as e:  # noqa: BLE001 - e.g. a CPU-only build: one line instead of a traceback
                raise AttentionError(f"xformers cannot run here ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
                    from None
        else:
            m.set_processor(AttnProcessor2_0())
    return kind
