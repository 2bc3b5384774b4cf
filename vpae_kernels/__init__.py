"""The DiT's hot-path ops behind one switch.

Each op has a Triton implementation and a plain-PyTorch `<op>_ref` (the specification and the
CPU fallback) in its own file. `VPAE_KERNELS` picks the path: `triton`, `torch`, or `auto` (the default).
`auto` never makes an unmeasured kernel the default of a long run: on a GPU each op takes the path that
`bench.py gpu` measured faster on that chip (the table in measured.json), and PyTorch (SDPA, whose cuDNN/flash
backends are tuned per chip) on a chip the table does not name; under TRITON_INTERPRET=1 on CPU, Triton (the
tests); elsewhere PyTorch. `use_triton` reads the module variable `MODE` at call time, so tests can flip it.
"""
import functools
import json
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # e.g. CPU-only wheels: the kernel files still import (their _ref paths work), nothing launches
    HAVE_TRITON = False
    triton = SimpleNamespace(jit=lambda f: f, autotune=lambda *a, **k: (lambda f: f), Config=lambda *a, **k: None)
    tl = SimpleNamespace(constexpr=None)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as triton reads it when the kernels are defined

from . import attention as _attention, norm as _norm, qk_norm_rope as _qk_norm_rope  # noqa: E402 (needs triton/tl)
from .attention import attention_ref  # noqa: E402
from .norm import ln_modulate_ref  # noqa: E402
from .qk_norm_rope import qk_norm_rope_ref  # noqa: E402

MODE = os.environ.get("VPAE_KERNELS", "auto")
if MODE not in ("auto", "triton", "torch"):
    raise ValueError(f"VPAE_KERNELS={MODE!r}: use auto, triton or torch")

MEASURED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measured.json")
_table = None  # MEASURED as read at first use: {device name: {op: {"use": "triton" | "torch", "speedup": ...}}}


def winner(op, chip):
    """The path `bench.py gpu` measured faster for op on this chip (a CUDA device name); torch if it has not."""
    global _table
    if _table is None:
        _table = {}
        if os.path.exists(MEASURED):
            with open(MEASURED) as f:
                _table = json.load(f)
    return _table.get(chip, {}).get(op, {}).get("use", "torch")


@functools.lru_cache(maxsize=None)
def _device_name(index):  # asked once per GPU: _chip runs on every op call
    return torch.cuda.get_device_name(index)


def _chip(x):  # the device name auto looks up, None off CUDA (tests pretend a chip here)
    return _device_name(x.device.index) if x.is_cuda else None


def use_triton(x: torch.Tensor, op: str = "attention") -> bool:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if MODE == "torch":
        return False
    if MODE == "auto":
        chip = _chip(x)
        return HAVE_TRITON and (winner(op, chip) == "triton" if chip else interpret)
    if not HAVE_TRITON:
        raise RuntimeError("VPAE_KERNELS=triton but Triton is not installed: "
                           "pip install triton, or use VPAE_KERNELS=auto")
    if not (x.is_cuda or interpret):
        raise RuntimeError("VPAE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before importing kernels")
    return True


def attention(q, k, v, k_lens=None):
    """softmax(q k^T / sqrt(D)) v on [B, L, H, D]; keys at positions >= k_lens[b] are masked."""
    # the interpreter's bf16 tl.dot is wrong (triton #11584): under auto, bf16 on CPU takes the reference
    if use_triton(q, "attention") and (q.is_cuda or q.dtype != torch.bfloat16 or MODE == "triton"):
        return _attention.flash_attention(q, k, v, k_lens)
    return attention_ref(q, k, v, k_lens)


def qk_norm_rope(x, weight, num_heads, eps, cos=None, sin=None):
    """RMSNorm over the full width, times weight, then (optionally) interleaved RoPE: [B,L,D] -> [B,L,H,D/H]."""
    if use_triton(x, "qk_norm_rope"):
        return _qk_norm_rope.qk_norm_rope(x, weight, num_heads, eps, cos, sin)
    return qk_norm_rope_ref(x, weight, num_heads, eps, cos, sin)


def ln_modulate(x, shift, scale, eps, out_dtype=None):
    """LayerNorm without affine, then ln(x) * (1 + scale) + shift, statistics in fp32."""
    if use_triton(x, "ln_modulate"):
        return _norm.ln_modulate(x, shift, scale, eps, out_dtype)
    return ln_modulate_ref(x, shift, scale, eps, out_dtype)
