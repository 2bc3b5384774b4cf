"""The Wan2.1 DiT, from scratch, with the official module names so official weights load unchanged.

Reads top to bottom: helpers (sinusoid, RoPE) -> attention -> block -> head -> model -> presets -> loading.
The facts it relies on (shapes, constants, dtypes) are stated where they are used; the tests re-derive the math.
"""
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint, noop_context_fn

import vpae_kernels as kernels

# -----------------------------------------------------------------------------
# helpers


def sinusoid(dim, t):
    """Timestep embedding, [cos, sin] (cos first), computed in float64 as official, returned fp32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()  # (B, dim)


def rope_angles(head_dim, grid, device=None):
    """Angles of Wan's 3D RoPE for an (F, H, W) token grid -> cos, sin [F*H*W, head_dim/2] fp32.

    The head_dim/2 complex pairs split 22/21/21 (for 128) over time/height/width; each axis has its own
    frequencies 10000^(-2j/D_a) over its own real width D_a (44/42/42). Built in float64 as official.
    """
    d = head_dim
    dims = [d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)]  # real widths per axis (t, h, w)
    parts = []
    for axis, (n, da) in enumerate(zip(grid, dims)):
        theta = 1.0 / 10000.0 ** (torch.arange(0, da, 2, dtype=torch.float64, device=device) / da)
        ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * theta  # (n, da/2)
        shape = [1, 1, 1, da // 2]
        shape[axis] = n
        parts.append(ang.view(shape).expand(*grid, da // 2))
    ang = torch.cat(parts, dim=-1).reshape(-1, d // 2)  # (F*H*W, d/2), raster order (f, h, w), w fastest
    return torch.cos(ang).float(), torch.sin(ang).float()


def linear32(lin, x):
    """A Linear in fp32 whatever the parameter dtype: Wan keeps the time MLP and the head in fp32."""
    return F.linear(x.float(), lin.weight.float(), lin.bias.float())


def all_to_all(x, group, split, join):
    """Ulysses all-to-all with autograd. `split` (an einops pattern) lays x out as (n, ...) over the n ranks of the
    group: chunk j goes to rank j. What arrives is (n, ...), chunk j from rank j, and `join` lays it out."""
    n = dist.get_world_size(group)
    y = funcol.all_to_all_single_autograd(rearrange(x, split, n=n).contiguous(), None, None, group)
    return rearrange(funcol.wait_tensor(y), join, n=n)


def gather_seq(x, group, L):
    """All-gather the sequence chunks of every rank (with autograd) and drop the padding: [B, L, ...]."""
    x = funcol.wait_tensor(funcol.all_gather_tensor_autograd(x.contiguous(), gather_dim=1, group=group))
    return x if x.shape[1] == L else x[:, :L].clone()  # a copy, not a view: FSDP2 warns on returned views


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (WanLayerNorm)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads at once); the math lives in kernels.qk_norm_rope."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


# -----------------------------------------------------------------------------
# attention


class SelfAttention(nn.Module):
    """Self-attention with q/k RMSNorm and 3D RoPE (official WanSelfAttention)."""

    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, cos, sin, k_lens=None, sp=None):
        q = kernels.qk_norm_rope(self.q(x), self.norm_q.weight, self.num_heads, self.eps, cos, sin)  # (B, L, H, hd)
        k = kernels.qk_norm_rope(self.k(x), self.norm_k.weight, self.num_heads, self.eps, cos, sin)
        v = rearrange(self.v(x), "b l (h d) -> b l h d", h=self.num_heads)
        if sp is None:
            return self.o(kernels.attention(q, k, v, k_lens).flatten(2))  # (B, L, D)
        # Ulysses: trade the sequence split (each rank l of the n*l tokens) for a head split (h of the n*h heads),
        # attend over the full sequence, trade back
        q, k, v = (all_to_all(a, sp, "b l (n h) d -> n b l h d", "n b l h d -> b (n l) h d") for a in (q, k, v))
        o = all_to_all(kernels.attention(q, k, v, k_lens), sp, "b (n l) h d -> n b l h d", "n b l h d -> b l (n h) d")
        return self.o(o.flatten(2))


class CrossAttention(nn.Module):
    """Cross-attention to the text tokens and, for i2v/flf2v, separately to the CLIP image tokens.

    The two attention outputs share q and are summed before the shared output projection. Nothing is
    masked: the text context is zero-padded to text_len and all of it is attended, as the official code does.
    """

    def __init__(self, dim, num_heads, eps, image):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)  # there is no norm on v_img

    def forward(self, x, txt, img=None):
        n, heads = self.num_heads, "b l (h d) -> b l h d"
        q = kernels.qk_norm_rope(self.q(x), self.norm_q.weight, n, self.eps)  # (B, L, H, hd)
        k = kernels.qk_norm_rope(self.k(txt), self.norm_k.weight, n, self.eps)  # (B, Lt, H, hd)
        o = kernels.attention(q, k, rearrange(self.v(txt), heads, h=n)).flatten(2)
        if img is not None:
            k = kernels.qk_norm_rope(self.k_img(img), self.norm_k_img.weight, n, self.eps)  # (B, Li, H, hd)
            o = o + kernels.attention(q, k, rearrange(self.v_img(img), heads, h=n)).flatten(2)
        return self.o(o)


# -----------------------------------------------------------------------------
# block and head


class WanAttentionBlock(nn.Module):
    """adaLN-modulated self-attention, un-modulated cross-attention, modulated FFN."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.eps
        # norm1 (before self-attn) and norm2 (before the FFN) have no affine parameters; norm3 does
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm32(D, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.eps, image=cfg.model_type != "t2v")
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D**0.5)

    def forward(self, x, e0, txt, img, cos, sin, k_lens=None, sp=None):
        # x (B, L, D) is the fp32 residual stream; e0 (B, 6, D) fp32; matmuls run in the parameter dtype
        cdt = self.ffn[0].weight.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)
        a = kernels.ln_modulate(x, shift_sa, scale_sa, self.eps, cdt)
        x = x + self.self_attn(a, cos, sin, k_lens, sp).float() * gate_sa
        x = x + self.cross_attn(self.norm3(x).to(cdt), txt, img).float()
        a = kernels.ln_modulate(x, shift_ff, scale_ff, self.eps, cdt)
        return x + self.ffn(a).float() * gate_ff


class Head(nn.Module):
    """Final adaLN (modulated by e, not e0) and the linear to patch pixels, all in fp32."""

    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return linear32(self.head, kernels.ln_modulate(x, shift, scale, self.eps, torch.float32))


class MLPProj(nn.Module):
    """CLIP image tokens -> model width (img_emb). Exact GELU and LayerNorm eps 1e-5, unlike the rest."""

    def __init__(self, clip_dim, dim, flf):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm32(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
                                  nn.Linear(clip_dim, dim), LayerNorm32(dim))
        if flf:  # first and last frame: 2 x 257 tokens with a learned position embedding
            self.emb_pos = nn.Parameter(torch.zeros(1, 514, clip_dim))

    def forward(self, x):
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos.float()
        return self.proj(x.to(self.proj[1].weight.dtype))


# -----------------------------------------------------------------------------
# the model


@dataclass
class WanConfig:
    """Architecture; the official config.json maps onto it (the fields it omits take these defaults)."""

    model_type: str = "t2v"  # t2v | i2v | flf2v
    patch_size: tuple = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    clip_dim: int = 1280
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-6


class WanModel(nn.Module):
    """The Wan2.1 DiT: v = model(x, t, context[, clip_fea, y]), the flow velocity eps - x0."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        assert cfg.model_type in ("t2v", "i2v", "flf2v"), f"model_type {cfg.model_type!r}: use t2v, i2v or flf2v"
        assert cfg.dim % cfg.num_heads == 0 and (cfg.dim // cfg.num_heads) % 2 == 0, "head_dim must be even"
        self.cfg, D = cfg, cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.model_type != "t2v":
            self.img_emb = MLPProj(cfg.clip_dim, D, flf=cfg.model_type == "flf2v")
        self.grad_ckpt = False  # per-block activation checkpointing
        self.ckpt_context = noop_context_fn  # checkpoint's context_fn (distill.add_lora: recompute as the forward ran)
        self.sp_group = None  # a process group: Ulysses sequence parallelism over its ranks (set by the caller)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_weights(self):
        """Official init: xavier linears, zero biases, N(0, 0.02) embeddings, zero head (so v starts at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def forward(self, x, t, context, clip_fea=None, y=None, taps=()):
        """x [B,16,F,H,W], t [B] in [0,1000], context [B,L<=text_len,text_dim]; i2v: clip_fea [B,257,1280]
        (flf2v [B,514,1280]) and y [B,20,F,H,W]. Returns float32 [B,16,F,H,W].

        With taps (block indices), returns (v, hidden, ctx): the residual stream after each tapped block,
        [B, L, D] fp32, and the embedded context (image tokens first, then text), for the discriminator.
        """
        cfg = self.cfg
        if (cfg.model_type == "t2v") != (y is None) or (y is None) != (clip_fea is None):
            raise ValueError(f"a {cfg.model_type} model needs clip_fea and y" if y is None and clip_fea is None
                             else "clip_fea and y go together, and only to an i2v or flf2v model")
        if y is not None:
            x = torch.cat([x, y], dim=1)  # (B, 36, F, H, W): noisy | mask | condition latent
        cdt = self.patch_embedding.weight.dtype
        B, C, F_, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_dim or F_ % pt or H % ph or W % pw:
            raise ValueError(f"latent {tuple(x.shape)} (with y): need {cfg.in_dim} channels and F, H, W divisible "
                             f"by the patch {cfg.patch_size}")
        grid = (F_ // pt, H // ph, W // pw)
        x = self.patch_embedding(x.to(cdt)).flatten(2).transpose(1, 2).float()  # (B, L, D), raster (f, h, w)
        cos, sin = rope_angles(cfg.dim // cfg.num_heads, grid, x.device)
        L, sp, k_lens = x.shape[1], self.sp_group, None
        if sp is not None:
            # each rank keeps one chunk of the (zero-padded) sequence; the padding is masked as keys and
            # rotates by angle 0. (Official xDiT leaves pad keys unmasked; masking them is exact.)
            n, r = dist.get_world_size(sp), dist.get_rank(sp)
            pad = -L % n
            x = F.pad(x, (0, 0, 0, pad)).chunk(n, dim=1)[r]
            cos, sin = F.pad(cos, (0, 0, 0, pad), value=1.0).chunk(n)[r], F.pad(sin, (0, 0, 0, pad)).chunk(n)[r]
            k_lens = torch.full((B,), L, device=x.device) if pad else None  # no mask when nothing is padded

        # time embedding and its projection in fp32 (official runs them in an fp32 autocast region)
        e = linear32(self.time_embedding[2], F.silu(linear32(self.time_embedding[0], sinusoid(cfg.freq_dim, t))))
        e0 = linear32(self.time_projection[1], F.silu(e)).unflatten(1, (6, cfg.dim))  # (B, 6, D)

        # text: zero rows up to text_len, all of them attended (no mask), as official
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; at most text_len={cfg.text_len}")
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        txt = self.text_embedding(context.to(cdt))  # (B, text_len, D)
        img = self.img_emb(clip_fea).to(cdt) if clip_fea is not None else None  # (B, 257 or 514, D)

        hidden = []
        for i, block in enumerate(self.blocks):
            if self.grad_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, txt, img, cos, sin, k_lens, sp, use_reentrant=False,
                               context_fn=self.ckpt_context)
            else:
                x = block(x, e0, txt, img, cos, sin, k_lens, sp)
            if i in taps:
                hidden.append(x if sp is None else gather_seq(x, sp, L))

        out = self.head(x, e)  # (B, L, prod(patch) * out_dim) fp32
        if sp is not None:
            out = gather_seq(out, sp, L)
        # unpatchify: token (f, h, w) of the grid holds its (pt, ph, pw) patch with the channels c fastest
        out = rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                        f=grid[0], h=grid[1], pt=pt, ph=ph, pw=pw)
        if taps:
            ctx = txt if img is None else torch.cat([img, txt], dim=1)
            return out, hidden, ctx
        return out

    # -------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", weights=None, edit=None):
        """Load an official checkpoint directory (config.json + single or sharded safetensors), or one
        .safetensors file with the official key names (e.g. an exported student) with config.json beside it.
        weights: another .safetensors file to take the weights from (a student of the checkpoint at path).
        edit(name, tensor) -> tensor: applied to each file tensor before the cast to dtype (sample.py merges LoRAs
        there, in fp32, so a bf16 model rounds once).

        The model is built on the meta device and filled with tensors memory-mapped from the files, so a
        checkpoint is never held twice in memory. dtype None keeps the file's dtype (fp32 for Wan); with
        another dtype, the small modules Wan keeps in fp32 (time MLP, modulations, head) stay fp32.
        """
        path = os.fspath(path)
        cfg = load_config(os.path.dirname(path) if path.endswith(".safetensors") else path)
        with torch.device("meta"):
            model = cls(cfg)
        state = {}
        for shard in weight_files(os.fspath(weights) if weights else path):
            for name, tensor in read_safetensors(shard):
                keep32 = dtype is not None and (name.startswith(FP32_PREFIXES) or "modulation" in name)
                target = torch.float32 if keep32 and tensor.is_floating_point() else dtype
                state[name] = (edit(name, tensor) if edit else tensor).to(device=device, dtype=target)
        load_strict(model, state, weights or path)
        return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# the discriminator heads (V-PAE Phase II; README: "How V-PAE works")


class DiscHead(nn.Module):
    """Learnable queries cross-attend to one block's hidden states, then an MLP gives one logit per sample.

    With `semantic`, the queries first pass one self-attention layer together with the projected image
    and text tokens of the backbone's context, so the logit can judge the video against its condition.
    """

    def __init__(self, dim, width, n_queries, semantic, head_dim=64):
        super().__init__()
        self.heads = width // head_dim
        self.queries = nn.Parameter(torch.randn(1, n_queries, width) * 0.02)
        self.norm_h = nn.LayerNorm(dim, elementwise_affine=False)
        self.q, self.kv, self.o = nn.Linear(width, width), nn.Linear(dim, 2 * width), nn.Linear(width, width)
        if semantic:
            self.ctx_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
            self.sem = nn.TransformerEncoderLayer(width, self.heads, 4 * width, dropout=0.0, activation="gelu",
                                                  batch_first=True, norm_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, h, ctx=None):
        # h (B, L, D): hidden states of one tapped block; ctx (B, Lc, D): the backbone's embedded context
        # the heads compute in their parameters' dtype (bf16 under FSDP2's mixed precision); the logit is fp32
        n, dt = self.queries.shape[1], self.q.weight.dtype
        z = self.queries.expand(h.shape[0], -1, -1)
        if hasattr(self, "sem"):
            z = self.sem(torch.cat([z, self.ctx_proj(ctx.to(dt))], dim=1))[:, :n]  # keep the query positions
        q = rearrange(self.q(z), "b n (h d) -> b n h d", h=self.heads)
        k, v = rearrange(self.kv(self.norm_h(h.float()).to(dt)), "b l (two h d) -> two b l h d", two=2, h=self.heads)
        z = z + self.o(kernels.attention(q, k, v).flatten(2))  # (B, n, width)
        return self.mlp(z).float().mean(dim=(1, 2))  # (B,)


class Discriminator(nn.Module):
    """D(x) = sum of one DiscHead per tapped backbone block. Only these heads train (the backbone is frozen)."""

    def __init__(self, dim, taps, width=0, n_queries=4, semantic=True):
        super().__init__()
        self.taps, width = tuple(taps), width or min(1024, dim)  # 0: sized to the backbone, at most 1024
        self.heads = nn.ModuleList(DiscHead(dim, width, n_queries, semantic) for _ in self.taps)

    def forward(self, hidden, ctx):
        return sum(head(h, ctx) for head, h in zip(self.heads, hidden))  # (B,)


FP32_PREFIXES = ("time_embedding.", "time_projection.", "head.")

PRESETS = {  # the official sizes (as in their config.json files) and a tiny one for tests
    "t2v-1.3B": WanConfig("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v-14B": WanConfig("t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-14B": WanConfig("i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "flf2v-14B": WanConfig("flf2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "tiny": WanConfig("t2v", dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, clip_dim=32, text_len=16),
}


def load_config(path):
    """config.json -> WanConfig. Unknown keys (_class_name, _diffusers_version, ...) are ignored."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f} not found: pass an official Wan2.1 checkpoint directory as the path")
    with open(f) as fh:
        raw = json.load(fh)
    names = {fl.name for fl in fields(WanConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    return replace(WanConfig(), **kw)


def weight_files(path):
    """The DiT safetensors of a checkpoint directory: a single file, or the shards named by the index."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found")
        return [path]
    single = os.path.join(path, "diffusion_pytorch_model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"shard {f} is named in {index} but missing: download it again")
        return files
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors (or its .index.json) in {path}")


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_safetensors(f):
    """Yield (name, tensor), each a zero-copy view of a private (copy-on-write) memory map of the file.

    Pages are read only when a tensor is touched. Once the caller has taken a tensor (kept the view, or
    converted it), its pages are released from this process; a kept view re-reads them from the file on
    the next touch. So peak memory stays near one copy of the weights, whatever the target dtype or device.
    A truncated file names itself.
    """
    size = os.path.getsize(f)
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0] if size >= 8 else 0
        if n == 0 or 8 + n > size:
            raise ValueError(f"{f} is not a complete safetensors file (truncated header): download it again")
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{f} is truncated ({size} bytes, the header needs {8 + n + end}): download it again")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if end else None
    for name, v in header.items():
        a, b = (8 + n + o for o in v["data_offsets"])
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=b - a, offset=a) if b > a else torch.empty(0, dtype=torch.uint8)
        yield name, raw.view(DTYPES[v["dtype"]]).view(v["shape"])
        if b > a:
            start = a - a % mmap.PAGESIZE
            buf.madvise(mmap.MADV_DONTNEED, start, b - start)


def load_strict(model, sd, path, prefix=""):
    """Strict load_state_dict(assign=True), after one error naming every missing, unexpected or misshapen tensor.

    Shared by the DiT, VAE and encoder loaders. prefix: what the file's keys carry before the module names.
    """
    want = model.state_dict()  # meta tensors: names and shapes only
    bad = [f"missing {prefix}{k}" for k in want if k not in sd]
    bad += [f"unexpected {prefix}{k}" for k in sd if k not in want]
    bad += [f"{prefix}{k} is {tuple(sd[k].shape)}, expected {tuple(v.shape)}" for k, v in want.items()
            if k in sd and sd[k].shape != v.shape]
    if bad:
        more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError(f"{path} does not match the official layout: {'; '.join(bad[:8])}{more}")
    model.load_state_dict(sd, strict=True, assign=True)
