"""LayerNorm (no affine) + adaLN modulation, fused: y = LN(x) * (1 + scale) + shift.

Wan runs this before every self-attention and FFN on the fp32 residual stream (spec section 1.4):
unfused it is a layer_norm, a multiply and an add, each reading and writing [B, L, D] in fp32. Here one
program per token row reads x once, takes mean and variance in fp32 (biased, like F.layer_norm),
modulates with the per-sample shift/scale [B, 1, D] and writes y once, in `out_dtype` (e.g. bf16 for
the following matmul). The backward recomputes the statistics from x and reduces dShift / dScale over
the tokens of each sample in per-program fp32 partials (deterministic, no atomics).
Reference: `ln_modulate_ref` below.
"""
import torch
import torch.nn.functional as F

from . import triton, tl


@triton.jit
def _fwd_kernel(X, SHIFT, SCALE, Y, sxb, sxl, ssb, scb, L, D, eps, BLOCK: tl.constexpr):
    l, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(X + b * sxb + l * sxl + offs, mask=mask, other=0.0).to(tl.float32)
    xc = tl.where(mask, x - tl.sum(x, 0) / D, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
    shift = tl.load(SHIFT + b * ssb + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scb + offs, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(Y + (b * L + l) * D + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(X, SCALE, DY, DX, DSHIFT, DSCALE, sxb, sxl, scb, L, D, eps, n_prog, BLOCK: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    scale1 = 1.0 + tl.load(SCALE + b * scb + offs, mask=mask, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK], tl.float32)
    dscale = tl.zeros([BLOCK], tl.float32)
    for l in range(pid, L, n_prog):  # a strided set of this sample's tokens
        x = tl.load(X + b * sxb + l * sxl + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + (b * L + l) * D + offs, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - tl.sum(x, 0) / D, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
        xhat = xc * rstd
        dshift += dy
        dscale += dy * xhat
        g = dy * scale1
        dx = rstd * (g - tl.sum(g, 0) / D - xhat * (tl.sum(g * xhat, 0) / D))
        tl.store(DX + (b * L + l) * D + offs, dx.to(DX.dtype.element_ty), mask=mask)
    part = (b * n_prog + pid) * D + offs  # partials [B, n_prog, D], summed by the launcher
    tl.store(DSHIFT + part, dshift, mask=mask)
    tl.store(DSCALE + part, dscale, mask=mask)


def _meta(D):
    block = triton.next_power_of_2(D)
    return dict(BLOCK=block, num_warps=max(1, min(16, block // 256)))  # about 8 elements per thread


class _LNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype):
        B, L, D = x.shape
        sh, sc = shift.expand(B, 1, D), scale.expand(B, 1, D)  # [1,1,D] or [B,1,D]; views, no copy
        y = torch.empty(B, L, D, device=x.device, dtype=out_dtype)
        _fwd_kernel[(L, B)](x, sh, sc, y, x.stride(0), x.stride(1), sh.stride(0), sc.stride(0), L, D, eps, **_meta(D))
        ctx.save_for_backward(x, scale)
        ctx.eps, ctx.shift_meta = eps, (shift.shape, shift.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        B, L, D = x.shape
        sc = scale.expand(B, 1, D)
        n_prog = min(L, 1024 // B + 1) if x.is_cuda else min(L, 2)  # about a thousand programs on a GPU
        dx = torch.empty(B, L, D, device=x.device, dtype=x.dtype)
        dshift = torch.empty(B, n_prog, D, device=x.device, dtype=torch.float32)
        dscale = torch.empty_like(dshift)
        _bwd_kernel[(n_prog, B)](x, sc, dy.contiguous(), dx, dshift, dscale, x.stride(0), x.stride(1), sc.stride(0),
                                 L, D, ctx.eps, n_prog, **_meta(D))
        shift_shape, shift_dtype = ctx.shift_meta
        dshift = dshift.sum(1, keepdim=True).sum_to_size(shift_shape).to(shift_dtype)
        dscale = dscale.sum(1, keepdim=True).sum_to_size(scale.shape).to(scale.dtype)
        return dx, dshift, dscale, None, None


def ln_modulate(x, shift, scale, eps, out_dtype=None):
    """Triton path of `ln_modulate`: x [B,L,D], shift/scale [B,1,D] (or [1,1,D]) -> [B,L,D] in out_dtype."""
    if x.dim() != 3 or shift.dim() != 3 or scale.dim() != 3 or shift.shape[1:] != (1, x.shape[2]) \
            or scale.shape[1:] != (1, x.shape[2]) or shift.shape[0] not in (1, x.shape[0]) \
            or scale.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"ln_modulate wants x [B,L,D] and shift, scale [B,1,D]; got {tuple(x.shape)}, "
                         f"{tuple(shift.shape)}, {tuple(scale.shape)}")
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    return _LNModulate.apply(x, shift, scale, eps, out_dtype or x.dtype)


def ln_modulate_ref(x, shift, scale, eps, out_dtype=None):
    # x [B,L,D]; shift, scale [B,1,D]. Statistics and the modulation in fp32, as Wan does.
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (1 + scale.float()) + shift.float()
    return y.to(out_dtype or x.dtype)
