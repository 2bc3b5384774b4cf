"""The Wan2.1 video VAE, from scratch, with the official module names so Wan2.1_VAE.pth loads unchanged.

Reads top to bottom: causal conv -> norm -> residual / attention / resample blocks -> encoder, decoder ->
the VAE with chunked encode/decode, spatial tiling and loading.

Time is compressed 4x and space 8x8, causally: latent frame 0 encodes pixel frame 0 alone, latent frame k
adds pixel frames 4k-3..4k and sees only earlier ones. Encode and decode run chunk by chunk ([0], [1..4],
[5..8], ... pixel frames per latent frame) and carry a small cache of past frames between chunks, so
activation memory does not grow with the clip length (only the output does).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import load_strict

DIM_MULT = (1, 2, 4, 4)  # channel multipliers of the four resolution stages (fixed in the release)
# Per-channel statistics of the 16 latent channels: encode returns (mu - mean) / std, decode undoes it.
LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

# -----------------------------------------------------------------------------
# layers. `cache` is a dict shared by all chunks of one encode/decode pass, keyed by module.


class CausalConv3d(nn.Conv3d):
    """Conv3d padded 2p frames in front and none behind, so output frame t sees only input frames <= t."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride)  # no built-in padding: F.pad below does it
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.pad = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: W, H, then T (front, back)

    def forward(self, x, cache=None):  # x: (B, C, T, H, W)
        pad, n = list(self.pad), self.pad[4]
        if cache is not None and n > 0:
            # The last n frames of the input stream stand in for the zero padding of the next chunk. Taking
            # them after the concat covers the official 1-frame-chunk rule (keep the previous last frame too).
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], 2)
                pad[4] = n - prev.shape[2]
            cache[self] = x[:, :, -n:].clone()  # clone: a view would keep the whole chunk alive
        return super().forward(F.pad(x, pad))


class RMS_norm(nn.Module):
    """RMS norm over channels: F.normalize (L2, eps 1e-12) * sqrt(C) * gamma; no bias. The norm is written out:
    torch's vector norm over dim 1 of a 5-D tensor is 3x slower on CPU (two thirds of a toy VAE decode)."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return x / (x * x).sum(1, keepdim=True).sqrt().clamp_min(1e-12) * self.scale * self.gamma


def run(layers, x, cache):
    """Apply layers in order, handing the chunk cache to those that keep state across chunks."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


def per_frame(fn, x):
    """Apply a 2D op to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    B, T = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B*T, C', H', W')
    return y.unflatten(0, (B, T)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1x1 conv shortcut when the width changes."""

    def __init__(self, cin, cout):
        super().__init__()
        # index 5 is Dropout(0) in the release; kept as a no-op so the conv keys stay residual.2 / residual.6
        self.residual = nn.Sequential(RMS_norm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
                                      RMS_norm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cache):
        return run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across time)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, f):  # f: (N, C, H, W), N = B*T
        N, C, H, W = f.shape
        qkv = self.to_qkv(self.norm(f)).flatten(2).transpose(1, 2)  # (N, H*W, 3C), channels q | k | v
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # 3 x (N, 1, H*W, C): one head of width C
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        return self.proj(o.squeeze(1).transpose(1, 2).unflatten(2, (H, W)))  # (N, C, H, W)

    def forward(self, x):
        return x + per_frame(self.attend, x)


class Resample(nn.Module):
    """2x spatial down/up-sampling per frame; 'down3d' also halves time, 'up3d' doubles it (causally)."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):  # nearest copies values, so it is exact in any dtype
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right/bottom only, so the stride-2 conv sees pixels (0, 1, 2), (2, 3, 4), ...
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "up3d":  # every frame becomes two: its 2C output channels are (earlier | later) frame
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "down3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):  # x: (B, C, T, H, W)
        B, C, T, H, W = x.shape
        if self.mode == "up3d":
            # Chunk 0 (latent frame 0) is not doubled: it becomes pixel frame 0 alone (the official 'Rep'
            # mark). Later chunks run the causal time conv with its own cache; its first call is zero-padded,
            # so latent frame 0 never enters it. (The official cache holds [zeros, x1] after that call where
            # this one holds [x1] and pads one zero frame: the conv input is the same.)
            if self in cache:
                x = self.time_conv(x, cache)  # (B, 2C, T, H, W)
                x = x.view(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)
            cache[self] = "Rep"
        x = per_frame(self.resample, x)
        if self.mode == "down3d":
            # Chunk 0 (one frame) passes through, its time conv skipped. Later chunks prepend the previous
            # chunk's last frame and run the stride-2 time conv unpadded: 1 + 4 frames -> 2, then 1 + 2 -> 1.
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2))
        return x


# -----------------------------------------------------------------------------
# encoder and decoder


class Encoder3d(nn.Module):
    """Video (B, 3, T, H, W) -> (B, 2z, 1 + (T-1)/4, H/8, W/8): mean and log-variance."""

    def __init__(self, dim, z2):
        super().__init__()
        dims = [dim * m for m in (1, *DIM_MULT)]  # [96, 96, 192, 384, 384]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            blocks += [ResidualBlock(cin, cout), ResidualBlock(cout, cout)]
            if i < 3:  # time is halved by the 2nd and 3rd downsamples only
                blocks.append(Resample(cout, "down2d" if i == 0 else "down3d"))
        self.downsamples = nn.ModuleList(blocks)
        c = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        self.head = nn.Sequential(RMS_norm(c), nn.SiLU(), CausalConv3d(c, z2, 3, padding=1))

    def forward(self, x, cache):
        return run([self.conv1, *self.downsamples, *self.middle, *self.head], x, cache)


class Decoder3d(nn.Module):
    """Latent (B, z, T, h, w) -> video (B, 3, 1 + 4(T-1), 8h, 8w), before clamping."""

    def __init__(self, dim, z):
        super().__init__()
        dims = [dim * m for m in (DIM_MULT[-1], *DIM_MULT[::-1])]  # [384, 384, 384, 192, 96]
        self.conv1 = CausalConv3d(z, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin if i == 0 else cin // 2  # each upsample's spatial conv halves the width
            blocks += [ResidualBlock(cin, cout), ResidualBlock(cout, cout), ResidualBlock(cout, cout)]
            if i < 3:  # time is doubled by the 1st and 2nd upsamples only
                blocks.append(Resample(cout, "up3d" if i < 2 else "up2d"))
        self.upsamples = nn.ModuleList(blocks)
        self.head = nn.Sequential(RMS_norm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x, cache):
        return run([self.conv1, *self.middle, *self.upsamples, *self.head], x, cache)


# -----------------------------------------------------------------------------
# the VAE


class WanVAE(nn.Module):
    """The Wan2.1 VAE: [-1, 1] video <-> normalised latent, 4x in time and 8x8 in space, causal in time."""

    def __init__(self, dim=96, z_dim=16):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, 2 * z_dim)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)  # -> mu | log-variance (the latter unused)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)  # applied to the latent before the decoder
        self.decoder = Decoder3d(dim, z_dim)
        # Plain lists, not buffers: buffers would be left on the meta device by from_pretrained. The
        # statistics exist for the released z_dim=16 only; other sizes (tests) are left unnormalised.
        self.stats = (LATENT_MEAN, LATENT_STD) if z_dim == 16 else ([0.0] * z_dim, [1.0] * z_dim)

    @property
    def dtype(self):
        return self.conv1.weight.dtype

    def latent_stats(self, ref):
        return [torch.tensor(s, dtype=torch.float32, device=ref.device).view(1, -1, 1, 1, 1) for s in self.stats]

    def encode(self, video, progress=None):
        """video (B, 3, T, H, W) in [-1, 1], T = 4n+1 -> normalised latent (B, z, 1+n, H/8, W/8) fp32.

        Deterministic: returns the normalised mean; no sampling. progress: optional wrapper over the chunks.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video of shape [B, 3, T, H, W], got {list(video.shape)}")
        T, H, W = video.shape[2:]
        if (T - 1) % 4 or H % 8 or W % 8:
            raise ValueError(f"the VAE needs 4n+1 frames and height/width divisible by 8, got T={T}, H={H}, "
                             f"W={W}: trim the clip to 1, 5, 9, ..., 81 frames and resize it")
        x = video.to(self.dtype)
        chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, T, 4)]  # frames [0], [1..4], [5..8], ...
        cache = {}
        out = torch.cat([self.encoder(c, cache) for c in (progress or iter)(chunks)], 2)  # (B, 2z, 1+n, h, w)
        mu = self.conv1(out)[:, :self.z_dim].float()
        mean, std = self.latent_stats(mu)
        return (mu - mean) / std

    def decode(self, z, progress=None, tile=None, overlap=8):
        """Normalised latent (B, z, T, h, w) -> video (B, 3, 1 + 4(T-1), 8h, 8w) in [-1, 1] fp32.

        tile: decode in overlapping spatial tiles of tile x tile latent pixels, `overlap` latent pixels
        shared and blended linearly; None decodes whole frames. tile=32, overlap=8 gives diffusers' 256-pixel
        tiles at a 192-pixel stride. progress wraps the chunks, or the tiles when tiled.
        """
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected a latent of shape [B, {self.z_dim}, T, h, w], got {list(z.shape)}")
        mean, std = self.latent_stats(z)
        x = self.conv2((z.float() * std + mean).to(self.dtype))  # 1x1x1, so it commutes with tiling
        if tile is None:
            return self.decode_frames(x, progress).float().clamp(-1, 1)
        return self.decode_tiled(x, tile, overlap, progress or iter).clamp(-1, 1)

    def decode_frames(self, x, progress=None):
        """Decoder over the whole latent, one latent frame per chunk: (B, z, T, h, w) -> (B, 3, 1+4(T-1), H, W)."""
        cache = {}
        frames = (progress or iter)(range(x.shape[2]))
        return torch.cat([self.decoder(x[:, :, t:t + 1], cache) for t in frames], 2)

    def decode_tiled(self, x, tile, overlap, progress):
        """Decode spatial tiles one at a time, each with its own full pass over time, and blend them.

        Why: the memory peak is in the last decoder stages, where one 4-frame chunk at 720x1280 is 1.4 GB
        per 96-channel activation in fp32 (2.8 GB for the upsampled 192-channel one), several alive at once
        plus conv workspace; with the clip's output on top, that crowds a 24 GB GPU. A tile cuts the peak by
        its share of the frame. The result is close to, not equal to, the whole-frame decode: convolutions
        lose context at the seams and the middle attention sees only its own tile.
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"tile must be larger than overlap >= 0 (latent pixels), got tile={tile}, overlap={overlap}")
        B, _, T, h, w = x.shape

        def starts(n):  # tile origins along one axis; the last tile is shifted back to end at the border
            s = list(range(0, max(n - tile, 0) + 1, tile - overlap))
            return s + [n - tile] if s[-1] + tile < n else s

        def ramp(a, n, total):  # blend weights along one axis (pixels): rise over `overlap` at inner edges
            p = torch.arange(8 * n, device=x.device) + 0.5
            r, ov = torch.ones_like(p), max(8 * overlap, 1)
            r = r.minimum(p / ov) if a > 0 else r
            return r.minimum((8 * n - p) / ov) if a + n < total else r

        out = torch.zeros(B, 3, 1 + 4 * (T - 1), 8 * h, 8 * w, device=x.device)  # (B, 3, T', H, W)
        weight = torch.zeros(8 * h, 8 * w, device=x.device)
        for i, j in progress([(i, j) for i in starts(h) for j in starts(w)]):
            th, tw = min(tile, h - i), min(tile, w - j)
            y = self.decode_frames(x[..., i:i + th, j:j + tw]).float()  # (B, 3, T', 8th, 8tw)
            r = ramp(i, th, h)[:, None] * ramp(j, tw, w)[None, :]  # (8th, 8tw)
            out[..., 8 * i:8 * (i + th), 8 * j:8 * (j + tw)] += y * r
            weight[8 * i:8 * (i + th), 8 * j:8 * (j + tw)] += r
        return out / weight

    # -------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load the official Wan2.1_VAE.pth (a flat state dict), memory-mapped, into a model built on meta.

        The widths are read from the file (encoder.conv1 -> base dim, conv2 -> z_dim), so tiny test files load too.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VAE weights not found at {path}: pass the Wan2.1_VAE.pth file from the "
                                    "Wan2.1 checkpoint directory")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        dim = state["encoder.conv1.weight"].shape[0] if "encoder.conv1.weight" in state else 96
        z_dim = state["conv2.weight"].shape[0] if "conv2.weight" in state else 16
        with torch.device("meta"):
            model = cls(dim, z_dim)
        load_strict(model, {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, path)
        return model.eval().requires_grad_(False)
