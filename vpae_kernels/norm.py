"""LayerNorm (no affine) + adaLN modulation, fused: y = LN(x) * (1 + scale) + shift.

Wan runs this before every self-attention and FFN on the fp32 residual stream:
unfused it is a layer_norm, a multiply and an add, each reading and writing [B, L, D] in fp32. Here each
program reads a tile of token rows once, takes mean and variance in fp32 (biased, like F.layer_norm),
modulates with the per-sample shift/scale [B, 1, D] and writes y once, in `out_dtype` (e.g. bf16 for
the following matmul). The backward recomputes the statistics from x and reduces dShift / dScale over
the tokens of each sample in per-program fp32 partials (deterministic, no atomics).
Reference: `ln_modulate_ref` below.
"""
import torch
import torch.nn.functional as F

from . import INTERPRET, tl, triton

# elements per program tile; the interpreter's cost is per program and per op, not per element
TILE = 1 << 16 if INTERPRET else 4096


@triton.jit
def _normalize(X, b, sxb, sxl, rows, offs, mask, D, eps):
    # a (ROWS, BLOCK) tile of x in fp32 -> LN(x) and 1/std per row (biased variance, like F.layer_norm)
    x = tl.load(X + b * sxb + rows[:, None] * sxl + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    xc = tl.where(mask, x - (tl.sum(x, 1) / D)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    return xc * rstd[:, None], rstd[:, None]


@triton.jit
def _fwd_kernel(X, SHIFT, SCALE, Y, sxb, sxl, ssb, scb, L, D, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # tokens of sample b
    offs = tl.arange(0, BLOCK)
    mask = (rows < L)[:, None] & (offs < D)[None, :]
    xhat, _ = _normalize(X, b, sxb, sxl, rows, offs, mask, D, eps)
    shift = tl.load(SHIFT + b * ssb + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(SCALE + b * scb + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :]
    y = xhat * (1.0 + scale) + shift
    tl.store(Y + (b * L + rows[:, None]) * D + offs[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(X, SCALE, DY, DX, DSHIFT, DSCALE, sxb, sxl, scb, L, D, eps, n_prog,
                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    scale1 = 1.0 + tl.load(SCALE + b * scb + offs, mask=offs < D, other=0.0).to(tl.float32)[None, :]
    dshift = tl.zeros([ROWS, BLOCK], tl.float32)
    dscale = tl.zeros([ROWS, BLOCK], tl.float32)
    for start in range(pid * ROWS, L, n_prog * ROWS):  # a strided set of this sample's token tiles
        rows = start + tl.arange(0, ROWS)
        mask = (rows < L)[:, None] & (offs < D)[None, :]
        xhat, rstd = _normalize(X, b, sxb, sxl, rows, offs, mask, D, eps)
        dy = tl.load(DY + (b * L + rows[:, None]) * D + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        dshift += dy
        dscale += dy * xhat
        g = dy * scale1
        dx = rstd * (g - (tl.sum(g, 1) / D)[:, None] - xhat * (tl.sum(g * xhat, 1) / D)[:, None])
        tl.store(DX + (b * L + rows[:, None]) * D + offs[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    part = (b * n_prog + pid) * D + offs  # partials [B, n_prog, D], summed by the launcher
    tl.store(DSHIFT + part, tl.sum(dshift, 0), mask=offs < D)
    tl.store(DSCALE + part, tl.sum(dscale, 0), mask=offs < D)


def _meta(D):
    block = triton.next_power_of_2(D)
    rows = max(1, TILE // block)  # several tokens per program at small widths, one at D = 5120
    return dict(ROWS=rows, BLOCK=block, num_warps=max(1, min(16, rows * block // 256)))  # ~8 elements a thread


class _LNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, out_dtype):
        B, L, D = x.shape
        sh, sc = shift.expand(B, 1, D), scale.expand(B, 1, D)  # [1,1,D] or [B,1,D]; views, no copy
        y = torch.empty(B, L, D, device=x.device, dtype=out_dtype)
        meta = _meta(D)
        _fwd_kernel[(triton.cdiv(L, meta["ROWS"]), B)](x, sh, sc, y, x.stride(0), x.stride(1), sh.stride(0),
                                                        sc.stride(0), L, D, eps, **meta)
        ctx.save_for_backward(x, scale)
        ctx.eps, ctx.shift_meta = eps, (shift.shape, shift.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        B, L, D = x.shape
        sc = scale.expand(B, 1, D)
        meta = _meta(D)
        tiles = triton.cdiv(L, meta["ROWS"])
        n_prog = min(tiles, 1024 // B + 1) if x.is_cuda else min(tiles, 2)  # about a thousand programs on a GPU
        dx = torch.empty(B, L, D, device=x.device, dtype=x.dtype)
        dshift = torch.empty(B, n_prog, D, device=x.device, dtype=torch.float32)
        dscale = torch.empty_like(dshift)
        _bwd_kernel[(n_prog, B)](x, sc, dy.contiguous(), dx, dshift, dscale, x.stride(0), x.stride(1), sc.stride(0),
                                 L, D, ctx.eps, n_prog, **meta)
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
