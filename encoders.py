"""Wan2.1's frozen encoders, from scratch: the umT5-XXL text encoder (+ tokenizer) and the CLIP ViT-H/14 vision tower.

Module names equal the keys of the official files `models_t5_umt5-xxl-enc-bf16.pth` and (under `visual.`)
`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, so both load with a strict load_state_dict and no
rename table. Sizes are read off the tensors, so tiny test files in the same layout take the same path.
"""
import html
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from model import LayerNorm32, load_strict

try:  # the official cleaning starts with ftfy.fix_text; ftfy is not a dependency here (see clean_text)
    import ftfy
except ImportError:
    ftfy = None

TEXT_LEN = 512  # the official tokenizer pads/truncates every prompt to 512 tokens
CLIP_HEAD_DIM = 80  # ViT-H/14 is 16 heads x 80; the file does not store the head count
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, also used by Wan
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# loading helpers


def _open(pth, what):
    """torch.load with mmap: tensors are paged in only when adopted by load_state_dict(assign=True)."""
    if not Path(pth).is_file():
        raise FileNotFoundError(f"{pth} not found: it should be the official Wan2.1 {what}")
    return torch.load(pth, map_location="cpu", weights_only=True, mmap=True)


def _shape(sd, key, pth):
    if key not in sd:
        raise ValueError(f"{pth} has no tensor {key}: it is not an official-layout checkpoint")
    return tuple(sd[key].shape)


def _num_blocks(sd, prefix):
    # from the highest index, so a block with missing tensors is reported by _load rather than dropped
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)), default=-1)


# -----------------------------------------------------------------------------
# umT5-XXL encoder (the official models_t5_umt5-xxl-enc-bf16.pth)


def clean_text(text):
    """The official prompt cleaning (HuggingfaceTokenizer, clean='whitespace').

    Official always runs ftfy.fix_text first. ftfy is not a dependency of this project, so it runs only when
    installed; without it, prompts with mojibake, curly quotes or full-width characters may tokenize
    differently from the official code (plain ASCII is unaffected). `pip install ftfy` for exact parity.
    """
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()  # twice, as official
    return re.sub(r"\s+", " ", text).strip()


def rel_bucket(rel, num_buckets=32, max_dist=128):
    """Bidirectional T5 bucket of a relative position rel = k_pos - q_pos (long tensor, any shape).

    Half the buckets are for keys after the query. Within a half, distances below half/2 get a bucket each,
    larger ones log-spaced buckets up to max_dist, and everything beyond shares the last one.
    """
    half = num_buckets // 2
    exact = half // 2
    r = rel.abs()
    # same fp32 op order as the official code, so the boundary distances 16, 32, 64 land in the same bucket;
    # the clamp only keeps log() finite where the exact branch is taken anyway
    far = exact + (torch.log(r.clamp(min=exact).float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(r < exact, r, far.clamp(max=half - 1))


def gelu_tanh(x):
    # written out as official rather than F.gelu(approximate="tanh"): in bf16 each op rounds, and this keeps parity
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5Norm(nn.Module):
    """T5LayerNorm: RMS scaling without mean or bias; statistics in fp32, scaled in the weight dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # fp32
        return self.weight * x.type_as(self.weight)  # cast before the scale, as official


class T5Attention(nn.Module):
    """Self-attention with no 1/sqrt(d) scaling (T5 folds it into the init) and an additive bias."""

    def __init__(self, dim, dim_attn, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (f(x).view(B, L, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, H, L, Dh)
        att = q @ k.transpose(-1, -2) + bias  # (B, H, L, L), unscaled
        att = att.float().softmax(-1).type_as(att)  # softmax in fp32, as official
        return self.o((att @ v).transpose(1, 2).reshape(B, L, -1))  # (B, L, D)


class T5FeedForward(nn.Module):
    """Gated FFN: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, dim, dim_ffn):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False))  # a Sequential only for the key gate.0
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate(x)))


class T5RelativeBias(nn.Module):
    """Bucket -> per-head bias table; umT5 gives every layer its own (shared_pos=False)."""

    def __init__(self, num_buckets, heads):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, heads)

    def forward(self, buckets):
        return self.embedding(buckets).permute(2, 0, 1)[None]  # (L, L) -> (1, H, L, L)


class T5Block(nn.Module):
    def __init__(self, dim, dim_attn, dim_ffn, heads, num_buckets):
        super().__init__()
        self.norm1 = T5Norm(dim)
        self.attn = T5Attention(dim, dim_attn, heads)
        self.norm2 = T5Norm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = T5RelativeBias(num_buckets, heads)

    def forward(self, x, buckets, keep):
        bias = self.pos_embedding(buckets)  # (1, H, L, L)
        bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)  # (B, H, L, L): padding keys get ~-inf
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """umT5-XXL encoder (official: vocab 256384, dim 4096, 24 layers, 64 heads, ffn 10240, 32 buckets)."""

    def __init__(self, vocab, dim, dim_attn, dim_ffn, heads, layers, num_buckets, max_dist=128):
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.token_embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(T5Block(dim, dim_attn, dim_ffn, heads, num_buckets) for _ in range(layers))
        self.norm = T5Norm(dim)
        self.tokenizer, self.eos_id, self.pad_id = None, 1, 0  # set from tokenizer.json by from_pretrained

    def forward(self, ids, mask=None):
        """ids, mask (B, L) -> (B, L, dim); keys where mask == 0 are not attended."""
        B, L = ids.shape
        pos = torch.arange(L, device=ids.device)
        buckets = rel_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_dist)  # (Lq, Lk), k - q
        keep = torch.ones(B, L, dtype=torch.bool, device=ids.device) if mask is None else mask != 0
        x = self.token_embedding(ids)  # (B, L, D); no sqrt(D) scaling in T5
        for block in self.blocks:
            x = block(x, buckets, keep.view(B, 1, 1, L))
        return self.norm(x)

    def tokenize(self, texts):
        """Official settings: cleaned text + `</s>`, truncated to 512 with the EOS kept, padded with <pad>.

        The umT5 tokenizer.json appends `</s>` through its post-processor ("$A </s>"). We encode without special
        tokens and append it here, which gives the same ids and never appends it twice, whether or not a
        tokenizer.json has that post-processor. Returns ids, mask (B, 512) int64.
        """
        encs = self.tokenizer.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        ids = torch.full((len(texts), TEXT_LEN), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encs):
            row = e.ids[: TEXT_LEN - 1] + [self.eos_id]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    @torch.no_grad()
    def encode(self, texts):
        """Prompts -> list of (L_i, dim), L_i = tokens + EOS: the official cut to mask.sum() (DiT zero-pads later)."""
        ids, mask = self.tokenize([texts] if isinstance(texts, str) else list(texts))
        dev = self.token_embedding.weight.device
        out = self(ids.to(dev), mask.to(dev))  # (B, 512, D)
        return [o[:n] for o, n in zip(out, mask.sum(1).tolist())]

    @classmethod
    def from_pretrained(cls, pth, tokenizer_dir, dtype=torch.bfloat16, device="cpu"):
        """Official .pth + the google/umt5-xxl tokenizer folder. bf16 as official; fp32 for tests."""
        if dtype == torch.float16:  # official clamps infs in fp16; umT5 overflows there, so it is not offered
            raise ValueError("umT5 overflows in float16: use bfloat16 (official) or float32")
        tok_file = Path(tokenizer_dir) / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found: pass the google/umt5-xxl folder of the Wan2.1 checkpoint")
        sd = _open(pth, "umT5 encoder models_t5_umt5-xxl-enc-bf16.pth")
        vocab, dim = _shape(sd, "token_embedding.weight", pth)
        num_buckets, heads = _shape(sd, "blocks.0.pos_embedding.embedding.weight", pth)
        dim_attn = _shape(sd, "blocks.0.attn.q.weight", pth)[0]
        dim_ffn = _shape(sd, "blocks.0.ffn.fc1.weight", pth)[0]
        with torch.device("meta"):
            model = cls(vocab, dim, dim_attn, dim_ffn, heads, _num_blocks(sd, "blocks."), num_buckets)
        load_strict(model, sd, pth)
        tok = Tokenizer.from_file(str(tok_file))
        tok.no_truncation()  # tokenize() truncates and pads itself
        tok.no_padding()
        model.eos_id, model.pad_id = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
        if model.eos_id is None or model.pad_id is None:
            raise ValueError(f"{tok_file} has no </s> or <pad> token: it should be the umT5 tokenizer")
        model.tokenizer = tok
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# CLIP ViT-H/14 vision tower (the official open-clip xlm-roberta-large-vit-huge-14 .pth)


class CLIPAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        # to_qkv's output features are laid out (3, heads, head_dim): q | k | v, each split into heads
        q, k, v = self.to_qkv(x).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(Dh), as the official flash-attn call
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class CLIPBlock(nn.Module):
    """Pre-LN ViT block; exact (erf) GELU, not quick_gelu."""

    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps=1e-5)
        self.attn = CLIPAttention(dim, heads)
        self.norm2 = LayerNorm32(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))  # keys mlp.0, mlp.2

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVision(nn.Module):
    """The ViT-H/14 of open-clip-xlm-roberta-large-vit-huge-14, up to the output of its second-to-last block.

    Wan reads the features after block 31 of 32 (use_31_block): no post_norm and no head, so only blocks
    0..N-2 are built. Output (B, 257, 1280) for the official file: CLS + 16x16 patches.
    """

    def __init__(self, dim, patch, grid, layers, mlp_dim):
        super().__init__()
        self.image_size = grid * patch
        self.patch_embedding = nn.Conv2d(3, dim, patch, stride=patch, bias=False)  # no bias: pre_norm follows
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.pre_norm = LayerNorm32(dim, eps=1e-5)
        self.transformer = nn.Sequential(*[CLIPBlock(dim, dim // CLIP_HEAD_DIM, mlp_dim) for _ in range(layers)])

    def forward(self, pixels):
        """Normalised pixels (B, 3, S, S), S = image_size -> features (B, 1 + (S/patch)^2, dim)."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        x = torch.cat([self.cls_embedding.expand(len(x), -1, -1), x], dim=1) + self.pos_embedding  # (B, 1+g*g, D)
        return self.transformer(self.pre_norm(x))

    @torch.no_grad()
    def encode_image(self, img):
        """Images (B, 3, H, W) in [-1, 1], any size -> features, with the official preprocessing.

        Squash (no crop, no antialias) bicubic resize to image_size (224) in fp32, back to [0, 1], OpenAI CLIP mean/std.
        Official feeds the original-resolution image here, not the one resized for the VAE.
        """
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"encode_image takes RGB images (B, 3, H, W) in [-1, 1], got shape {tuple(img.shape)}")
        s = self.image_size
        x = F.interpolate(img.float(), size=(s, s), mode="bicubic", align_corners=False)  # (B, 3, S, S)
        x = x * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return self((x - mean) / std)

    @classmethod
    def from_pretrained(cls, pth, dtype=None, device="cpu"):
        """Official CLIP .pth (both towers); only the needed `visual.` tensors are read.

        dtype None: fp16 on CUDA (official runs fp16 params under fp16 autocast, which this matches: LayerNorms
        in fp32, everything else in fp16), fp32 elsewhere, where fp16 is slow.
        """
        if dtype is None:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        sd = _open(pth, "CLIP file models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        dim, _, patch, _ = _shape(sd, "visual.patch_embedding.weight", pth)
        grid = math.isqrt(_shape(sd, "visual.pos_embedding", pth)[1] - 1)
        mlp_dim = _shape(sd, "visual.transformer.0.mlp.0.weight", pth)[0]
        if dim % CLIP_HEAD_DIM:
            raise ValueError(f"{pth} has vision width {dim}, not a multiple of the ViT-H head size {CLIP_HEAD_DIM}")
        with torch.device("meta"):
            model = cls(dim, patch, grid, _num_blocks(sd, "visual.transformer.") - 1, mlp_dim)
        # Deliberately ignored: the last block, post_norm, head, log_scale and the whole XLM-R text tower.
        want = model.state_dict()
        load_strict(model, {k[7:]: v for k, v in sd.items() if k.startswith("visual.") and k[7:] in want}, pth, "visual.")
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
