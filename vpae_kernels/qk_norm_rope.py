"""q/k RMSNorm across heads + Wan's interleaved 3D RoPE, fused.

One pass per token: read x [D] once, take the RMS over the full model width D (all heads at once,
in fp32), multiply by the weight, rotate each pair (2j, 2j+1) of every head by angle j of that token
(cos/sin tables [L, D/H/2], the same for all heads; GPT-J style, not rotate-half) and write the result
as [B, L, H, D/H] in x's dtype. The unfused version reads and writes the [B, L, D] activation three times
in fp32. The pairs are loaded as a (D/2, 2) tile and split, so memory access stays contiguous.
The backward recomputes the RMS from x (nothing but the inputs is saved), un-rotates dY with the
transposed rotation, and reduces dWeight over tokens in per-program fp32 partials (deterministic).
Reference: Wan2.1's WanRMSNorm + rope_apply, as `qk_norm_rope_ref` below.
"""
import torch

from . import INTERPRET, tl, triton

# elements per program tile; the interpreter's cost is per program and per op, not per element
TILE = 1 << 16 if INTERPRET else 4096


@triton.jit
def _tile(D, HALF_DH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # offsets of a (ROWS tokens, BLOCK pairs, 2) tile: each pair (2j, 2j+1) is contiguous in memory
    r = tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK)
    pair = j[:, None] * 2 + tl.arange(0, 2)[None, :]  # (BLOCK, 2) offsets within a row
    return r, j % HALF_DH, pair, j < D // 2


@triton.jit
def _rotate(y, COS, SIN, rows, jh, mask2, scl, sign):
    # rotate every pair of a (ROWS, BLOCK, 2) tile by its token's angle (times sign: -1 is the inverse)
    c = tl.load(COS + rows[:, None] * scl + jh[None, :], mask=mask2, other=0.0)
    s = tl.load(SIN + rows[:, None] * scl + jh[None, :], mask=mask2, other=0.0) * sign
    y0, y1 = tl.split(y)
    return tl.join(y0 * c - y1 * s, y0 * s + y1 * c)


@triton.jit
def _fwd_kernel(X, W, COS, SIN, Y, sxb, sxl, scl, L, D, eps,
                HALF_DH: tl.constexpr, HAS_ROPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    r, jh, pair, jmask = _tile(D, HALF_DH, ROWS, BLOCK)
    rows = tl.program_id(0) * ROWS + r  # tokens of sample b
    mask2 = (rows < L)[:, None] & jmask[None, :]
    mask = mask2[:, :, None]
    x = tl.load(X + b * sxb + rows[:, None, None] * sxl + pair[None], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, 2), 1) / D + eps)  # (ROWS,)
    y = x * rstd[:, None, None] * tl.load(W + pair, mask=jmask[:, None], other=0.0).to(tl.float32)[None]
    if HAS_ROPE:
        y = _rotate(y, COS, SIN, rows, jh, mask2, scl, 1.0)
    tl.store(Y + (b * L + rows[:, None, None]) * D + pair[None], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(X, W, COS, SIN, DY, DX, DW, sxb, sxl, scl, L, D, eps, n_prog,
                HALF_DH: tl.constexpr, HAS_ROPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    r, jh, pair, jmask = _tile(D, HALF_DH, ROWS, BLOCK)
    w = tl.load(W + pair, mask=jmask[:, None], other=0.0).to(tl.float32)[None]
    dw = tl.zeros([ROWS, BLOCK, 2], tl.float32)
    for start in range(pid * ROWS, L, n_prog * ROWS):  # a strided set of this sample's token tiles
        rows = start + r
        mask2 = (rows < L)[:, None] & jmask[None, :]
        mask = mask2[:, :, None]
        x = tl.load(X + b * sxb + rows[:, None, None] * sxl + pair[None], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + (b * L + rows[:, None, None]) * D + pair[None], mask=mask, other=0.0).to(tl.float32)
        if HAS_ROPE:  # the rotation is orthogonal: its backward rotates by -angle
            dy = _rotate(dy, COS, SIN, rows, jh, mask2, scl, -1.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, 2), 1) / D + eps)[:, None, None]
        xhat = x * rstd
        dw += dy * xhat
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(tl.sum(g * xhat, 2), 1) / D)[:, None, None])
        tl.store(DX + (b * L + rows[:, None, None]) * D + pair[None], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + (b * n_prog + pid) * D + pair, tl.sum(dw, 0), mask=jmask[:, None])  # partials [B, n_prog, D]


def _launch_args(x, weight, num_heads, cos, sin):
    B, L, D = x.shape
    if D % num_heads or (D // num_heads) % 2 or weight.shape != (D,):
        raise ValueError(f"qk_norm_rope: D={D} must split into {num_heads} heads of even size, weight [D]; "
                         f"got weight {tuple(weight.shape)}")
    half = D // num_heads // 2
    if cos is not None:
        if cos.shape != (L, half) or sin.shape != (L, half):
            raise ValueError(f"qk_norm_rope: cos/sin must be [L, head_dim/2] = [{L}, {half}]; got "
                             f"{tuple(cos.shape)}, {tuple(sin.shape)}")
        cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
    block = triton.next_power_of_2(D // 2)
    rows = max(1, TILE // (2 * block))  # several tokens per program at small widths, one at D = 5120
    warps = max(1, min(16, 2 * rows * block // 256))  # about 8 elements per thread
    rope = (cos, sin) if cos is not None else (weight, weight)  # placeholders, never read without RoPE
    return rope, dict(HALF_DH=half, HAS_ROPE=cos is not None, ROWS=rows, BLOCK=block, num_warps=warps)


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, num_heads, eps, cos, sin):
        B, L, D = x.shape
        (c, s), meta = _launch_args(x, weight, num_heads, cos, sin)
        y = torch.empty(B, L, num_heads, D // num_heads, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(L, meta["ROWS"]), B)
        _fwd_kernel[grid](x, weight, c, s, y, x.stride(0), x.stride(1), c.stride(0), L, D, eps, **meta)
        ctx.save_for_backward(x, weight, c, s)
        ctx.num_heads, ctx.eps, ctx.has_rope = num_heads, eps, cos is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, c, s = ctx.saved_tensors
        B, L, D = x.shape
        _, meta = _launch_args(x, weight, ctx.num_heads, None, None)
        meta["HAS_ROPE"] = ctx.has_rope
        tiles = triton.cdiv(L, meta["ROWS"])
        n_prog = min(tiles, 1024 // B + 1) if x.is_cuda else min(tiles, 2)  # about a thousand programs on a GPU
        dx = torch.empty(B, L, D, device=x.device, dtype=x.dtype)
        dw = torch.empty(B, n_prog, D, device=x.device, dtype=torch.float32)
        _bwd_kernel[(n_prog, B)](x, weight, c, s, dy.contiguous(), dx, dw, x.stride(0), x.stride(1), c.stride(0),
                                 L, D, ctx.eps, n_prog, **meta)
        return dx, dw.sum((0, 1)).to(weight.dtype), None, None, None, None


def qk_norm_rope(x, weight, num_heads, eps, cos=None, sin=None):
    """Triton path of `qk_norm_rope`: x [B,L,D] (last dim contiguous), weight [D] -> [B,L,H,D/H] in x's dtype."""
    if x.dim() != 3 or (cos is None) != (sin is None):
        raise ValueError(f"qk_norm_rope wants x [B,L,D] and both or neither of cos/sin; got x {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _QKNormRope.apply(x, weight.contiguous(), num_heads, eps, cos, sin)


def qk_norm_rope_ref(x, weight, num_heads, eps, cos=None, sin=None):
    # x [B,L,D] -> [B,L,H,D/H]. The RMS runs over the full width D (all heads at once), in fp32.
    B, L, D = x.shape
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.view(B, L, num_heads, D // num_heads)
    if cos is not None:
        # cos/sin [L, D/H/2]: pair j = (y[2j], y[2j+1]) is rotated by angle j (complex, not rotate-half)
        y0, y1 = y[..., 0::2], y[..., 1::2]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        y = torch.stack((y0 * c - y1 * s, y0 * s + y1 * c), dim=-1).flatten(-2)
    return y.to(x.dtype)
