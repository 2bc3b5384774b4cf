"""Fused flash attention (FlashAttention-2) on the model's [B, L, H, D] layout.

q k^T, the softmax and the product with v run in one kernel per (query block, batch*head), so the
Lq x Lk score matrix never reaches memory. The forward keeps the row log-sum-exp; the backward
recomputes P from it: a preprocess kernel for delta = rowsum(dO * O), a dK/dV kernel that loops over
query blocks and a dQ kernel that loops over key blocks (no atomics, deterministic). References:
Dao 2023 (FlashAttention-2, Alg. 1-2) and the Triton tutorial 06-fused-attention.py.

Beyond the tutorial: not causal; q/k/v/o are read and written in place through their strides (no
transposed copies); Lq may differ from Lk; any length (tails masked); per-sample key lengths k_lens
mask keys >= k_lens[b], and k_lens[b] == 0 gives output 0 (as the PyTorch reference does); a head dim
that is not a power of two (CLIP's 80) is padded to the next one in registers with masked loads.
fp16/bf16 dots accumulate in fp32; fp32 inputs use IEEE fp32 dots on a GPU (no TF32: fp32 attention is
for checks, the model runs it in bf16). The softmax is in fp32 and base 2. Output in the input dtype.
"""
import math

import torch
import torch.nn.functional as F

from . import INTERPRET, tl, triton


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and architecture, tuned per (Lq, Lk, head dim, k_lens or not,
# dtype) on a GPU. Each compiles for its own architecture at head dim 128 without spilling registers and within
# shared memory (`bench.py compile`; the tutorial's 128x64 with 4 warps spills). Hopper (sm_90) adds the 8-warp
# 128-row tiles its wgmma suits; every other GPU gets the sm_80 set.
_SM80 = {"_fwd_kernel": [(128, 32, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
         "_bwd_dkdv_kernel": [(64, 64, 8, 3), (32, 64, 8, 3), (16, 128, 8, 3), (16, 64, 4, 3)],
         "_bwd_dq_kernel": [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]}
_SM90_MORE = {"_fwd_kernel": [(128, 64, 8, 3), (128, 128, 8, 3)],  # each spills or overflows on sm_80
              "_bwd_dkdv_kernel": [(32, 128, 8, 3)], "_bwd_dq_kernel": [(128, 64, 8, 3)]}
CONFIGS = {k: {80: v, 90: v + _SM90_MORE[k]} for k, v in _SM80.items()}
KEY = ["Lq", "Lk", "BLOCK_D", "HAS_KLENS"]  # and the dtypes, which triton adds


def _configs(kernel, arch=90):
    # The sm_90 list holds the sm_80 one; _tuning drops the Hopper-only configs on other GPUs. The interpreter cannot
    # autotune over several configs; its cost is per op and loop step, so it gets one mid-sized config.
    cfgs = [(32, 64, 4, 1)] if INTERPRET else CONFIGS[kernel][arch]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfgs]


def _tuning(kernel):
    """triton.autotune's arguments: the kernel's configs, pruned to this GPU's own list at its first launch (asking
    the GPU at import would start CUDA in every process that imports the model)."""
    def prune(configs, named_args, **kwargs):
        if torch.cuda.get_device_capability() == (9, 0):
            return configs
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in CONFIGS[kernel][80]]
    return dict(configs=_configs(kernel), key=KEY, prune_configs_by={"early_config_prune": prune})


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, skn, svn, lo, hi, klen, qk_scale, d_mask,
               PREC: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kv_mask = ((start_n + offs_n) < klen)[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + start_n * skn, mask=kv_mask, other=0.0)  # (N, Dp)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (M, N), log2 units
        if MASK:  # only the last, partial key block pays for the mask
            qk = tl.where(((start_n + offs_n) < klen)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * svn, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**_tuning("_fwd_kernel"))
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KLENS, sm_scale, sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, sob, som, soh,
                H, Lq, Lk, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KLENS: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    klen = Lk
    if HAS_KLENS:
        klen = tl.minimum(tl.maximum(tl.load(KLENS + b), 0), Lk)
    b64 = b.to(tl.int64)  # B * L * H * D can pass 2**31
    q_mask = (offs_m < Lq)[:, None] & d_mask[None, :]
    q = tl.load(Q + b64 * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
    k_ptrs = K + b64 * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b64 * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    n_full = (klen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, skn, svn, 0, n_full, klen, qk_scale, d_mask,
                               PREC, False, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, skn, svn, n_full, klen, klen, qk_scale, d_mask,
                               PREC, True, BLOCK_N)
    empty = l_i == 0.0  # k_lens[b] == 0: no key at all; define the output as 0 and keep the LSE finite
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, tl.where(empty, 0.0, m_i + tl.log2(l_safe)), mask=offs_m < Lq)
    o_ptrs = O + b64 * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, som, soh, sdb, sdm, sdh, H, Lq,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.autotune(**_tuning("_bwd_dkdv_kernel"))
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KLENS, sm_scale, sqb, sqm, sqh, skb, skn, skh, svb, svn, svh,
                     sdb, sdm, sdh, sgb, sgm, sgh, H, Lq, Lk, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_KLENS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program owns BLOCK_N keys and loops over all queries. Rows of dK/dV depend only on their own key,
    # so padded or masked keys need no mask inside the loop: their rows are stored as 0 at the end. Padded
    # queries load q = dO = lse = delta = 0, which makes their dS and their dV contribution exactly 0.
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    klen = Lk
    if HAS_KLENS:
        klen = tl.minimum(tl.maximum(tl.load(KLENS + b), 0), Lk)
    kv_mask = (offs_n < klen)[:, None] & d_mask[None, :]
    k = tl.load(K + b64 * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_ptrs = Q + b64 * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
    do_ptrs = DO + b64 * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :]
    row_ptrs = bh.to(tl.int64) * Lq + offs_m
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    m_end = (start_n < klen).to(tl.int32) * Lq  # a block of masked keys skips the loop
    for start_m in range(0, m_end, BLOCK_M):
        m_mask = (start_m + offs_m) < Lq
        q = tl.load(q_ptrs + start_m * sqm, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (M, Dp)
        do = tl.load(do_ptrs + start_m * sdm, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(LSE + row_ptrs + start_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + row_ptrs + start_m, mask=m_mask, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])  # (N, M)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    keep = (offs_n < klen)[:, None]
    out_mask = (offs_n < Lk)[:, None] & d_mask[None, :]
    g_off = b64 * sgb + h * sgh + offs_n[:, None] * sgm + offs_d[None, :]  # dK and dV: fresh contiguous tensors
    dk_ptrs, dv_ptrs = DK + g_off, DV + g_off
    tl.store(dk_ptrs, tl.where(keep, dk * sm_scale, 0.0).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, tl.where(keep, dv, 0.0).to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, skn, svn, lo, hi, klen, qk_scale, d_mask,
              PREC: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        kv_mask = ((start_n + offs_n) < klen)[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + start_n * skn, mask=kv_mask, other=0.0)  # (N, Dp)
        v = tl.load(v_ptrs + start_n * svn, mask=kv_mask, other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])  # (M, N)
        if MASK:  # masked keys load k = 0, so they add nothing to dQ; this keeps an overflowing exp2 from 0 * inf
            p = tl.where(((start_n + offs_n) < klen)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.autotune(**_tuning("_bwd_dq_kernel"))
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KLENS, sm_scale, sqb, sqm, sqh, skb, skn, skh, svb, svn, svh,
                   sdb, sdm, sdh, sgb, sgm, sgh, H, Lq, Lk, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_KLENS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    b64 = b.to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    klen = Lk
    if HAS_KLENS:
        klen = tl.minimum(tl.maximum(tl.load(KLENS + b), 0), Lk)
    m_mask = offs_m < Lq
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b64 * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=m_mask, other=0.0)
    k_ptrs = K + b64 * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b64 * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    n_full = (klen // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, skn, svn, 0, n_full, klen, qk_scale, d_mask,
                   PREC, False, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, skn, svn, n_full, klen, klen, qk_scale, d_mask,
                   PREC, True, BLOCK_N)
    dq_ptrs = DQ + b64 * sgb + h * sgh + offs_m[:, None] * sgm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _strides(t):  # (batch, length, head) strides of a [B, L, H, D] tensor; the launcher makes D contiguous
    return t.stride(0), t.stride(1), t.stride(2)


def _meta(q, k_lens):
    B, Lq, H, D = q.shape
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_KLENS=k_lens is not None, PREC=prec)


def _flash_fwd(q, k, v, k_lens):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    o = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, Lq, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd_kernel[grid](q, k, v, o, lse, k_lens if k_lens is not None else lse, 1.0 / math.sqrt(D),
                      *_strides(q), *_strides(k), *_strides(v), *_strides(o), H, Lq, Lk, **_meta(q, k_lens))
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, k_lens):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    do = do if do.stride(-1) == 1 else do.contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk, dv = torch.empty(k.shape, device=k.device, dtype=k.dtype), torch.empty(v.shape, device=v.device, dtype=v.dtype)
    delta = torch.empty_like(lse)
    meta, kl, scale = _meta(q, k_lens), (k_lens if k_lens is not None else lse), 1.0 / math.sqrt(D)
    bm = 32 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(Lq, bm), B * H)](o, do, delta, *_strides(o), *_strides(do), H, Lq,
                                                    HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=bm)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    _bwd_dkdv_kernel[lambda m: (triton.cdiv(Lk, m["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, kl, scale, *common, *_strides(dk), H, Lq, Lk, **meta)
    _bwd_dq_kernel[lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, kl, scale, *common, *_strides(dq), H, Lq, Lk, **meta)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_lens):
        o, lse = _flash_fwd(q, k, v, k_lens)
        ctx.save_for_backward(q, k, v, o, lse, k_lens)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, k_lens = ctx.saved_tensors
        return (*_flash_bwd(do, q, k, v, o, lse, k_lens), None)


def flash_attention(q, k, v, k_lens=None):
    """Triton path of `attention`: q [B,Lq,H,D], k/v [B,Lk,H,D], k_lens [B] int or None -> [B,Lq,H,D]."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention wants q [B,Lq,H,D] and k, v [B,Lk,H,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if torch.is_autocast_enabled(q.device.type):  # behave like SDPA under autocast: run in the autocast dtype
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention wants q, k, v of one dtype among fp16/bf16/fp32; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256 or q.shape[0] * q.shape[2] > 65535:
        raise ValueError(f"attention supports head_dim <= 256 and B*H <= 65535; got {tuple(q.shape)}")
    if INTERPRET and q.dtype == torch.bfloat16 and not q.is_cuda:
        raise TypeError("attention: the Triton interpreter computes bf16 dots wrongly (triton #11584); "
                        "use fp32/fp16 on CPU or VPAE_KERNELS=auto")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k_lens is not None:
        if k_lens.shape != (q.shape[0],):
            raise ValueError(f"k_lens must have shape [B]={q.shape[0]}; got {tuple(k_lens.shape)}")
        k_lens = k_lens.to(device=q.device, dtype=torch.int32)
    return _FlashAttention.apply(q, k, v, k_lens)


def attention_ref(q, k, v, k_lens=None):
    # q [B,Lq,H,D], k/v [B,Lk,H,D]; k_lens [B] masks keys at positions >= k_lens[b]
    mask = None
    if k_lens is not None:
        mask = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None]  # (B, Lk)
        mask = mask[:, None, None, :]  # (B, 1, 1, Lk), broadcast over heads and queries
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)  # (B, Lq, H, D)
