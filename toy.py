"""A toy benchmark of V-PAE on synthetic moving shapes, and the bundled demo model (assets/demo).

  python toy.py                    # the whole pipeline into run/toy: results.md, results.json, strip.png
  python toy.py --train-teacher    # the same, with the VAE and teacher trained here instead of the bundled ones
  python toy.py --export-assets    # the same (finished stages are reused), then copy the models into assets/
  python toy.py --sweep            # candidate discriminator settings, judged on the validation split only
  python toy.py --sweep NAME --on-eval  # a candidate validation chose, reported on the evaluation split
  python toy.py --quick            # CI, a few minutes: a short distillation of the bundled demo teacher
  python toy.py --lora-table       # after the pipeline: the V-PAE students as LoRAs at ranks 16, 64 and full
  python toy.py --peers --phase2 400  # V-PAE beside DMD, DMD2 and adversarial-only, at equal steps and equal time

The pipeline: random-weight umT5 and CLIP in the official layout -> a tiny Wan VAE trained as an autoencoder
-> clips precomputed with data.precompute -> a tiny Wan I2V teacher trained with flow matching -> distill.py
(V-PAE and its ablations, each over several training seeds with its own Phase I) -> generation on held-out
conditions over several noise seeds, and the metrics. The encoders, VAE and teacher are those bundled in
assets/demo unless --train-teacher asks for them to be made here (about 19 min more on 2 cores), as a
distillation starts from a released teacher. Each stage writes into the output folder and is skipped when its
output is already there. Three disjoint sets of clips: training; validation (VAL_SEED), on which
settings are chosen; evaluation (EVAL_SEED), which only the final table sees.

The clips: data.synthetic_clip crosses its travel in m frames, m ~ U{17..50}, and the first 17 are kept. So a
first frame and its caption fix the shape, colour, place and direction but not the speed: the future is a
distribution, a one-step mean prediction smears it, and a good sampler draws one sharp speed.
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import data
import sample
import distill as D
from encoders import CLIPVision, T5Encoder
from model import WanModel, load_config
from vae import CausalConv3d, Resample, WanVAE

ROOT = os.path.dirname(os.path.abspath(__file__))
FRAMES, SIZE, SHIFT, GUIDE = 17, 64, 3.0, 3.0  # clip geometry; sigma shift and CFG scale (5 oversaturates this teacher)
T5_DIM, CLIP_DIM = 32, 80  # widths of the random encoders (CLIP: one head of 80)
DIT = dict(model_type="i2v", in_dim=36, out_dim=16, dim=128, ffn_dim=256, freq_dim=256, num_heads=4, num_layers=6,
           text_len=32, text_dim=T5_DIM, clip_dim=CLIP_DIM, eps=1e-6)  # 1.6M parameters, 80 tokens per clip
COMBOS = [(s, c, d) for s in data.SHAPES for c in data.COLOURS for d in data.DIRECTIONS]  # 72
HELD_OUT = [("circle", "red", "up"), ("square", "green", "left"), ("triangle", "blue", "down"),
            ("circle", "yellow", "left"), ("square", "purple", "right"), ("triangle", "white", "up")]  # never trained on
EVAL_SEED, EVAL_SPEEDS = 1000, 4  # the evaluation clips, and the real futures drawn for each of their conditions
VAL_SEED = 2000  # the validation clips: other places, backgrounds and combinations; settings are chosen on them
FULL = dict(vae_steps=(2000, 300), train_clips=1024, teacher_steps=3000, eval_clips=48, noise_seeds=(0, 1, 2),
            train_seeds=(0, 1, 2), phase1=200, phase2=1000)
QUICK = dict(train_clips=64, eval_clips=16, noise_seeds=(0, 1), train_seeds=(0,), phase1=40, phase2=80)
# the toy's recipe: the paper's losses and schedule shape, with lrs and head/LoRA sizes for a 1M-parameter model;
# lr_phase2 3e-5 was chosen on the validation split (--sweep round 4: at 1e-5 Phase II had not converged in 600 steps);
# the batch of 8 in one micro-batch: the losses of 8 micro-batches of 1 (draws are per clip; STR1 normalises over
# the 8, not per clip), 1.75x faster on CPU; C-SDS's target at w 7.5 below sigma' 0.75 (w 3 above) was chosen on the
# validation split (--sweep round 8: the student at the teacher's speed, FD within the spread); Phase II 1000 steps, not
# 600 (FULL), was chosen on the validation split (--sweep round 9: W1 2.80 against 3.35 px)
RECIPE = ["--batch_size=8", "--micro_batch=8", "--lr_phase1=1e-5", "--lr_phase2=3e-5", "--lr_fake=1e-4", "--lr_disc=1e-3",
          "--lora_rank=16", "--disc_width=128", f"--shift={SHIFT}", f"--guide_scale={GUIDE}", "--grad_ckpt=false",
          "--csds_guide_scale=7.5", "--csds_guide_until=0.75", "--export_dtype=fp32", "--log_every=20",
          "--ckpt_every=100000", "--val_every=100", "--grad_clip=0"]  # its tables were measured before --grad_clip
RUNS = {"full": [], "no_phase1": ["--phase1_steps=0"],
        "no_phase2": ["--phase2_steps=0"],  # Phase I alone: the EMA at the end of the seed's shared Phase I, exported
        "teacher_backbone": ["--disc_backbone=teacher"], "no_semantic": ["--semantic=false"],
        "no_csds": ["--lambda_csds=0"], "no_adv": ["--lambda_adv=0"]}
# --peers: the methods a user would pick instead, each over V-PAE's whole budget of generator steps (phase1 + phase2),
# on top of RECIPE (its lrs, sizes, shifts and guidance, chosen for the toy), with their own papers' choices:
PEERS = {
    "dmd": lambda n: [f"--phase1_steps={n}", "--phase2_steps=0", "--sigma_g_min=1", "--k_fake=5"],  # DMD from pure
    # noise, 5 fake-score updates per generator step (LightX2V, FastVideo, Self-Forcing)
    "dmd2": lambda n: PEERS["dmd"](n) + ["--gan_weight=0.03"],  # DMD2: plus a GAN whose heads read the fake score
    # (FastGen's Wan recipe: weight 0.03, lr 1e-5 for all three networks, here the recipe's lrs)
    "adv_only": lambda n: ["--phase1_steps=0", f"--phase2_steps={n}", "--lambda_csds=0", "--disc_backbone=teacher",
                           "--r1_sigma_t=0"],  # APT-style: the adversarial term and R1 only, D on the teacher
}
PEER_NAMES = {"dmd": "DMD", "dmd2": "DMD2", "adv_only": "adversarial only (APT-style)"}
PEER_RECIPE = {"dmd": ["--lr_phase1=3e-6"], "dmd2": ["--lr_phase1=3e-6"],  # each peer's settings, chosen on the
              "adv_only": ["--lambda_r1=1"]}  # validation split by --peer-sweep (EXPERIMENTS.md)
PEER_SWEEP = {  # --peer-sweep: (peer, arguments over PEERS' own), judged on the validation split
    "dmd": ("dmd", []), "dmd_k1": ("dmd", ["--k_fake=1"]), "dmd_lr3e-5": ("dmd", ["--lr_phase1=3e-5"]),
    "dmd2": ("dmd2", []), "dmd2_gan0.1": ("dmd2", ["--gan_weight=0.1"]),
    "adv_only": ("adv_only", ["--lambda_r1=0.01"]),  # APT's weight 100 on |D(x) - D(x + delta)|^2 at sigma 0.01,
    "adv_only_r1_1": ("adv_only", ["--lambda_r1=1"]),  # in STR1's normalisation; 1 = V-PAE's
    # the fake score's lr: at 1e-4 its own denoising loss rose to 4 in Phase I, 6x the teacher's on the same samples
    "dmd_fake1e-5": ("dmd", ["--lr_fake=1e-5"]), "dmd_k1_fake1e-5": ("dmd", ["--k_fake=1", "--lr_fake=1e-5"]),
    "vpae_fake1e-5": ("full", ["--lr_fake=1e-5"]),  # V-PAE with that Phase I ("full": V-PAE, with its own Phase I)
    # the generator's lr: at a fake-score lr of 1e-5 too, the fake score's loss rose to 2 in 60 steps (the teacher's on
    # real clips: 0.19), so G's own samples leave what the teacher can denoise
    "dmd_lr3e-6": ("dmd", ["--lr_phase1=3e-6"]), "vpae_p1lr3e-6": ("full", ["--lr_phase1=3e-6"]),
    "dmd2_lr3e-6": ("dmd2", ["--lr_phase1=3e-6"]),  # DMD2 at the lr that made DMD work
    "dmd2_lr3e-6_gan0.1": ("dmd2", ["--lr_phase1=3e-6", "--gan_weight=0.1"]),
}
ROWS = [  # (row, model, sampler, steps, NFE); "cfg" = Euler ODE with CFG, "x0" = the student sampler
    ("teacher, 50 steps + CFG", "teacher", "cfg", 50, 100), ("teacher, 4 steps + CFG", "teacher", "cfg", 4, 8),
    ("teacher, 1 step + CFG", "teacher", "cfg", 1, 2), ("teacher, 1 step, no CFG", "teacher", "x0", 1, 1),
    ("V-PAE student, 1 step", "full", "x0", 1, 1), ("V-PAE student, 4 steps", "full", "x0", 4, 4),
    ("ablation: no Phase I, 1 step", "no_phase1", "x0", 1, 1), ("ablation: no Phase II, 1 step", "no_phase2", "x0", 1, 1),
    ("ablation: D backbone = frozen teacher, 1 step", "teacher_backbone", "x0", 1, 1),
    ("ablation: no semantic head, 1 step", "no_semantic", "x0", 1, 1),
    ("ablation: lambda_csds = 0, 1 step", "no_csds", "x0", 1, 1),
    ("ablation: lambda_adv = 0 (C-SDS alone), 1 step", "no_adv", "x0", 1, 1)]
QUICK_ROWS = [r for r in ROWS if r[0] in ("teacher, 1 step, no CFG", "V-PAE student, 1 step")]
METRICS = {"fd": ("FD ↓", 2, -1), "psnr0": ("first-frame PSNR (dB) ↑", 1, 1), "motion": ("direction ↑", 2, 1),
           "in_range": ("speed in range ↑", 2, 1), "w1": ("speed W1 (px) ↓", 2, -1),
           "consistency": ("consistency ↑", 2, 1)}  # key: (column, decimals, +1 higher is better / -1 lower)

# -----------------------------------------------------------------------------
# metrics: pure functions of uint8 clips [F, H, W, 3]


def colour_mask(video, colour):
    """[F, H, W] bool: pixels whose nearest reference colour is `colour`. The references are the six palette
    colours of data.COLOURS and the clip's background, taken as the median pixel of its first frame."""
    v = video.astype(np.float32)
    refs = np.concatenate([np.array(list(data.COLOURS.values()), np.float32), np.median(v[0].reshape(-1, 3), 0)[None]])
    nearest = ((v[..., None, :] - refs) ** 2).sum(-1).argmin(-1)  # (F, H, W) index into refs
    return nearest == list(data.COLOURS).index(colour)


def displacement(video, colour, direction):
    """(along, across) in pixels: how far the shape moves along the captioned direction and across it. The
    centroid of colour_mask is taken in every frame where the mask has at least 4 pixels; the displacement runs
    from the first to the last of them. None when such frames cover less than half the clip (no trackable shape)."""
    mask = colour_mask(video, colour)
    seen = [f for f in range(len(mask)) if mask[f].sum() >= 4]
    if len(seen) < len(mask) / 2:
        return None
    centroid = lambda f: np.argwhere(mask[f]).mean(0)[::-1]  # noqa: E731  (x, y)
    dx, dy = centroid(seen[-1]) - centroid(seen[0])
    ux, uy = data.DIRECTIONS[direction]
    return float(dx * ux + dy * uy), float(abs(dx * uy - dy * ux))


def motion_correct(video, colour, direction, min_px=3.0):
    """Whether the shape moves along the captioned direction (see along_direction)."""
    return along_direction(displacement(video, colour, direction), min_px)


def along_direction(d, min_px=3.0):
    """For a displacement d of displacement(): it goes at least min_px along the direction and more along than across."""
    return d is not None and d[0] >= min_px and d[0] > d[1]


SPEED_GRID = list(range(FRAMES, 3 * FRAMES))  # every crossing time the clips are drawn with (make_clips)


def speed_metrics(along, real_along, tol=1.0):
    """The speed metric, defined before any result was looked at. along [N]: each generated clip's displacement
    along its caption's direction (nan: no trackable shape); real_along [N, G]: the real futures of the same N
    conditions at every speed of SPEED_GRID, through the same tracker. Returns
    - in_range: the fraction of clips whose displacement lies within [min, max] of its condition's real ones,
      +- tol pixels (an untracked clip is outside);
    - w1: the 1-D Wasserstein distance in pixels between all generated displacements (untracked = 0: nothing
      seen to move) and all real ones, pooled over conditions (every condition shares one speed distribution);
    and two diagnostics of W1's direction, added after the speed gap was found and kept out of the table:
    - slow: the fraction of clips below their condition's range (untracked included), of 1 - in_range;
    - ratio: the mean generated displacement over the mean real one (untracked = 0)."""
    along = np.asarray(along, np.float64)
    lo, hi = real_along.min(1) - tol, real_along.max(1) + tol
    inside = (along >= lo) & (along <= hi)  # False for nan
    g, r = np.sort(np.nan_to_num(along, nan=0.0)), np.sort(real_along.ravel())
    xs = np.sort(np.concatenate([g, r]))  # W1 = the integral of |F_g - F_r| over x, exactly
    cdf = lambda v: np.searchsorted(v, xs[:-1], side="right") / len(v)  # noqa: E731
    return {"in_range": float(inside.mean()), "w1": float(np.sum(np.abs(cdf(g) - cdf(r)) * np.diff(xs))),
            "slow": float(np.mean(~(along >= lo))), "ratio": float(g.mean() / r.mean())}  # nan >= lo is False


def consistency(video, colour, ref_area, tol=0.3):
    """Fraction of frames whose colour_mask area is within +-tol of ref_area (the shape's area in the condition
    image): the shape keeps its colour and its size. A colour change, a smear or a vanishing shape all fail it."""
    area = colour_mask(video, colour).sum((1, 2))
    return float(np.mean(np.abs(area / max(ref_area, 1) - 1) <= tol))


def psnr(a, b):
    """PSNR in dB between two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


PROJ = np.random.default_rng(0).standard_normal((5 * 8 * 8 * 3, 16))  # fixed, seed 0


def clip_feature(video):
    """16-d feature of a clip: frames 0, 4, 8, 12, 16 average-pooled to 8x8, in [0, 1], times a fixed Gaussian
    random projection (PROJ). Linear in the pixels, so it sees position, colour, size and blur alike."""
    f = video[::4].astype(np.float64) / 255  # (5, H, W, 3)
    n, h, w, _ = f.shape
    pooled = f.reshape(n, 8, h // 8, 8, w // 8, 3).mean((2, 4))  # (5, 8, 8, 3)
    return pooled.reshape(-1) @ PROJ


def frechet(a, b):
    """Frechet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).pow(2).sum() + sa.trace() + sb.trace() - 2 * cross)


# -----------------------------------------------------------------------------
# data


def make_clips(combos, seed, speeds=1, grid=None):
    """uint8 [N, speeds, F, H, W, 3] and captions: clip i shows combos[i] from a random start and background; its
    `speeds` versions share both and differ only in speed (so they are draws of one condition's future). With
    grid (a list of crossing times m), the same conditions at exactly those speeds instead of random ones."""
    rng, clips = np.random.default_rng(seed), []
    for s, c, d in combos:
        ms = rng.integers(FRAMES, 3 * FRAMES, size=speeds)
        state = rng.bit_generator.state
        clips.append([])
        for m in ms if grid is None else grid:
            rng.bit_generator.state = state
            clips[-1].append(data.synthetic_clip(s, c, d, int(m), SIZE, SIZE, rng)[:FRAMES])
    return np.array(clips), [data.caption(*k) for k in combos]


def eval_combos(n, seed=1):
    """The evaluation conditions: every held-out combination twice, the rest drawn from the trained ones."""
    seen = [k for k in COMBOS if k not in HELD_OUT]
    return (HELD_OUT * 2 + [seen[i] for i in np.random.default_rng(seed).integers(len(seen), size=n)])[:n]


def write_videos(folder, videos, captions):
    """A video folder in the format data.precompute reads: mp4s and captions.jsonl (videos [N, 1, F, H, W, 3])."""
    os.makedirs(folder, exist_ok=True)
    for i, v in enumerate(videos[:, 0]):
        sample.save_mp4(v, os.path.join(folder, f"clip_{i:05d}.mp4"))
    data.write_text("".join(json.dumps({"file": f"clip_{i:05d}.mp4", "caption": c}) + "\n"
                            for i, c in enumerate(captions)), os.path.join(folder, "captions.jsonl"))


def load_all(latents):
    """Every precomputed clip of a folder as one batch (contexts zero-padded to the longest), and the dataset."""
    ds = data.LatentDataset(latents)
    return data.collate([ds[i] for i in range(len(ds))]), ds


# -----------------------------------------------------------------------------
# the models


def copy_bundled(ckpt):
    """The encoders, VAE and teacher of assets/demo into ckpt (the teacher last: its file marks the stage done)."""
    demo = os.path.join(ROOT, "assets", "demo")
    bundled = {k: v for k, v in json.load(open(os.path.join(demo, "config.json"))).items() if k != "vpae_demo"}
    if bundled != json.load(open(os.path.join(ckpt, "config.json"))):
        sys.exit(f"toy.py: the teacher in {demo} is not of toy.DIT's shape: run with --train-teacher")
    shutil.copytree(demo, ckpt, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "config.json", "student.safetensors", "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(demo, "diffusion_pytorch_model.safetensors"), ckpt)
    print(f"copied the encoders, VAE and teacher of {demo}")


def write_encoders(ckpt):
    """Random-weight umT5 (width 32, 2 layers) and CLIP (width 80, 28-pixel input) in the official layout, and a
    word-level tokenizer.json for the caption words. Frozen random features still tell captions apart. Anything
    outside the vocabulary is <unk>, a run of non-ASCII characters is one token: Wan's Chinese negative prompt
    becomes [<unk>, </s>]."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    words = ["a", "moving", *data.SHAPES, *data.COLOURS, *data.DIRECTIONS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"[^\x00-\x7f]+"), "isolated")])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    os.makedirs(os.path.join(ckpt, sample.TOKENIZER_DIR), exist_ok=True)
    tok.save(os.path.join(ckpt, sample.TOKENIZER_DIR, "tokenizer.json"))
    torch.manual_seed(0)
    t5 = T5Encoder(vocab=3 + len(words), dim=T5_DIM, dim_attn=T5_DIM, dim_ffn=64, heads=4, layers=2, num_buckets=32)
    clip = CLIPVision(CLIP_DIM, patch=14, grid=2, layers=3, mlp_dim=4 * CLIP_DIM)  # Wan drops the last block: 2 run
    with torch.no_grad():
        clip.cls_embedding.normal_(0, 0.5), clip.pos_embedding.normal_(0, 0.5)
    data.atomic(os.path.join(ckpt, sample.CLIP_FILE),
                lambda f: torch.save({"visual." + k: v for k, v in clip.state_dict().items()}, f))
    data.atomic(os.path.join(ckpt, sample.T5_FILE),  # bf16, as official; last, as the stage's "done" marker
                lambda f: torch.save({k: v.bfloat16() for k, v in t5.state_dict().items()}, f))


def inflate(vae):
    """Make a VAE trained on single images act frame by frame on clips: every causal conv sees only the current
    frame, each temporal downsample keeps the later frame of a pair and each temporal upsample copies a frame.
    Latent frame k then holds pixel frame 4k, a good start for learning the frames in between."""
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, Resample) and hasattr(m, "time_conv"):
                w, c = m.time_conv.weight, m.time_conv.weight.shape[1]  # (k*C, C, 3, 1, 1), k = 1 down or 2 up
                w.zero_(), m.time_conv.bias.zero_()
                w[:, :, -1, 0, 0] = torch.eye(c).repeat(w.shape[0] // c, 1)
            elif isinstance(m, CausalConv3d) and m.kernel_size[0] == 3 and m.stride[0] == 1:
                m.weight[:, :, :-1] = 0


def train_vae(path, steps, log):
    """A Wan VAE of base width 8 (0.9M parameters) trained as an autoencoder on synthetic clips: first on single
    frames, 32x32 crops around the shape (cheap), then, inflated, on whole 9-frame clips. Loss: pixel MSE through
    encode and the unclamped decoder, with small latent noise, plus a penalty that keeps every normalised latent
    channel at mean 0 and variance 1 (the official mean/std are baked into encode/decode)."""
    torch.manual_seed(0)
    vae, rng = WanVAE(dim=8), np.random.default_rng(1)
    for n, p in vae.named_parameters():  # PyTorch's default init makes z nearly input-independent and AE training collapses
        if p.dim() > 1 and not n.endswith("gamma"):
            torch.nn.init.kaiming_normal_(p, nonlinearity="linear")

    def batch(n, frames, crop):
        v = make_clips([COMBOS[i] for i in rng.integers(len(COMBOS), size=n)], int(rng.integers(1 << 30)))[0][:, 0, :frames]
        if crop:  # a 32x32 window around the shape's first-frame centre, jittered by up to 8 pixels
            out = []
            for c in v:
                cy, cx = np.argwhere((c[0] != c[0, 0, 0]).any(-1)).mean(0).astype(int) - 16 + rng.integers(-8, 9, 2)
                cy, cx = np.clip([cy, cx], 0, SIZE - 32)
                out.append(c[:, cy:cy + 32, cx:cx + 32])
            v = np.stack(out)
        return torch.from_numpy(v).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (n, 3, F, h, w)

    def fit(n_steps, frames, n, crop, lr):
        opt = torch.optim.Adam(vae.parameters(), lr)
        for i in range(n_steps):
            x = batch(n, frames, crop)
            z = vae.encode(x)
            mean, std = vae.latent_stats(z)
            y = vae.decode_frames(vae.conv2((z + 0.05 * torch.randn_like(z)) * std + mean))
            dims = (0, 2, 3, 4)
            loss = F.mse_loss(y, x) + 0.01 * (z.mean(dims).pow(2) + (z.var(dims) - 1).pow(2)).mean()
            for g in opt.param_groups:  # 20 warm-up steps, then cosine decay
                g["lr"] = lr * min(1, (i + 1) / 20) * 0.5 * (1 + np.cos(np.pi * i / n_steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % 100 == 0 or i == n_steps - 1:
                log(f"vae T={frames} step {i}: loss {loss.item():.4f}")

    fit(steps[0], 1, 8, True, 1e-3)
    inflate(vae)
    fit(steps[1], 9, 2, False, 5e-4)
    data.atomic(path, lambda f: torch.save(vae.state_dict(), f))


def train_teacher(ckpt, latents, steps, log, batch_size=32, lr=3e-4):
    """The I2V teacher: flow matching, x_s = (1 - s) x0 + s eps, target eps - x0, t = 1000 s, s = shift(u, SHIFT),
    u ~ U[0, 1]. The condition is the official I2V one (y and CLIP of the first frame, precomputed); 10% of the
    captions are dropped for CFG, half to Wan's negative prompt and half to the empty one. The EMA is kept."""
    x, ds = load_all(latents)
    t5 = T5Encoder.from_pretrained(os.path.join(ckpt, sample.T5_FILE), os.path.join(ckpt, sample.TOKENIZER_DIR), torch.float32)
    pad = lambda c: F.pad(c, (0, 0, 0, DIT["text_len"] - c.shape[-2]))  # noqa: E731
    ctx, uncond = pad(x["context"]), torch.stack([pad(ds.neg_context), pad(t5.encode([""])[0].float())])
    torch.manual_seed(0)
    model = WanModel(load_config(ckpt)).train()
    ema = WanModel(load_config(ckpt)).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        i = torch.randint(len(ds), (batch_size,))
        x0, c = x["latent"][i], ctx[i].clone()
        drop = torch.rand(batch_size) < 0.1
        c[drop] = uncond[torch.randint(2, (int(drop.sum()),))]
        s = sample.shift_sigma(torch.rand(batch_size), SHIFT).view(-1, 1, 1, 1, 1)
        eps = torch.randn_like(x0)
        v = model((1 - s) * x0 + s * eps, 1000 * s.flatten(), c, x["clip"][i], x["y"][i])
        loss = F.mse_loss(v, eps - x0)
        for g in opt.param_groups:  # 100 warm-up steps, then cosine decay to 10%
            g["lr"] = lr * min(1, (step + 1) / 100) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        D.ema_update(ema, model, 0.999 if step > 500 else 0.0)
        if step % 200 == 0 or step == steps - 1:
            log(f"teacher step {step}: loss {loss.item():.4f}")
    save_state(ema.state_dict(), os.path.join(ckpt, "diffusion_pytorch_model.safetensors"))


def distill_job(job):
    """One distillation run, in a worker process under --jobs: copy in the Phase I checkpoint it resumes from
    (shared, if any), then distil. Returns the seconds it took."""
    ckpt, latents, val, out, args, log_file, shared, stop_after, threads = job
    torch.set_num_threads(threads)
    t0 = time.time()
    if shared and not os.path.isdir(os.path.join(out, os.path.basename(shared))):
        shutil.copytree(shared, os.path.join(out, os.path.basename(shared)))
    distill(ckpt, latents, val, out, args, log_file, stop_after)
    return time.time() - t0


def check_reused(run, args):
    """Stop if the finished run in `run` did not have the Phase II length that `args` (a distill.py argv) ask for."""
    want = int([a for a in args if a.startswith("--phase2_steps=")][-1].split("=")[1])
    ck = D.latest_ckpt(run)
    got = json.load(open(os.path.join(ck, "config.json")))["phase2_steps"] if ck else want
    if got != want:
        sys.exit(f"toy.py: {run} is a finished run of {got} Phase II steps, not the {want} asked for: give a new --out")


def pool(todo, jobs, times, log):
    """Run the distillation jobs {name: (done, job)} whose output `done` is missing, `jobs` at a time, each on the
    cores over the jobs that run at once; their seconds go into times."""
    for k, (d, job) in todo.items():
        if os.path.exists(d):
            if job[7] is None:  # a finished run, not a Phase I checkpoint (which serves any Phase II)
                check_reused(job[3], job[4])
            log(f"{k}: done before, skipped")
    done = {k: d for k, (d, _) in todo.items()}
    todo = {k: j for k, (d, j) in todo.items() if not os.path.exists(d)}
    n = max(1, min(jobs, len(todo)))
    todo = {k: (*j, max(1, torch.get_num_threads() // n)) for k, j in todo.items()}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx) if n > 1 else contextlib.nullcontext() as ex:
        for name, sec in zip(todo, (ex.map if ex else map)(distill_job, todo.values())):
            times[name] = sec
            log(f"{name}: {sec:.0f}s" + ("" if os.path.exists(done[name]) else ", stopped before its end"))
    if stopped := [k for k in todo if not os.path.exists(done[k])]:  # e.g. a SIGTERM: distill.py saved and exited 0
        sys.exit(f"toy.py: {', '.join(stopped)} stopped before the end: run the same command again to resume")


def distill(ckpt, latents, val, out, args, log_file, stop_after=None):
    """distill.main in this process (one CPU process: no FSDP wrapping, a free port), its output to log_file."""
    argv = [f"--teacher={ckpt}", f"--data={latents}", f"--val_data={val}", f"--out={out}", *RECIPE, *args]
    argv += [f"--stop_after={stop_after}"] if stop_after else []
    try:
        with open(log_file, "a") as f, contextlib.redirect_stdout(f):
            print("distill.py " + " ".join(argv), flush=True)
            D.main(argv)
    except SystemExit as e:  # distill.py exits 0 after --stop_after, with a checkpoint
        if e.code not in (0, None):
            raise


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def generate(dit, sampler, steps, cond, neg, seed):
    """Latents for a batch of conditions from noise seeded with `seed` (the same noise for every model)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(cond["y"].shape[0], 16, *cond["y"].shape[2:], generator=gen)
    with contextlib.redirect_stdout(io.StringIO()):  # sample.bar's progress lines
        if sampler == "cfg":
            return sample.sample_teacher(dit, noise, cond, neg, steps, SHIFT, GUIDE)
        return sample.sample_student(dit, noise, cond, steps, SHIFT, gen)


@torch.no_grad()
def decode(vae, z):
    """Latents -> uint8 clips [B, F, H, W, 3], 16 at a time."""
    v = torch.cat([vae.decode(z[i:i + 16]) for i in range(0, len(z), 16)])
    return ((v + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


def score(videos, real, captions, real_along):
    """The metrics of generated clips [N, F, H, W, 3] for the conditions of real [N, K, F, H, W, 3] (K real
    futures of each condition, all of which are the FD's reference set); real_along: see speed_metrics."""
    words = [c.split() for c in captions]  # "a {colour} {shape} moving {direction}"
    ref = np.stack([clip_feature(v) for v in real.reshape(-1, *real.shape[2:])])
    areas = [colour_mask(r[0, :1], w[1]).sum() for r, w in zip(real, words)]
    disp = [displacement(v, w[1], w[4]) for v, w in zip(videos, words)]  # tracked once, for direction and speed
    return {"fd": frechet(np.stack([clip_feature(v) for v in videos]), ref),
            "psnr0": float(np.mean([psnr(v[0], r[0, 0]) for v, r in zip(videos, real)])),
            "motion": float(np.mean([along_direction(d) for d in disp])),
            **speed_metrics([np.nan if d is None else d[0] for d in disp], real_along),
            "consistency": float(np.mean([consistency(v, w[1], a) for v, w, a in zip(videos, words, areas)]))}


def eval_set(latents, combos, seed):
    """The precomputed clips of a split as one batch, their conditions (cond, and the negative context), the real
    futures of each condition, the captions, and the real displacements at every speed (see speed_metrics)."""
    x, ds = load_all(latents)
    real, captions = make_clips(combos, seed, EVAL_SPEEDS)
    words = [c.split() for c in captions]
    real_along = np.array([[displacement(v, w[1], w[4])[0] for v in g]
                           for g, w in zip(make_clips(combos, seed, EVAL_SPEEDS, SPEED_GRID)[0], words)])
    batch = D.prepare(x, ds.neg_context, DIT["text_len"], "cpu")  # contexts padded, the negative one per clip
    return x, batch["cond"], batch["neg"]["context"], real, captions, real_along


@torch.no_grad()
def csds_pull(ckpt, student, latents, combos, seed, log, sigmas=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95), ws=(GUIDE, 7.5)):
    """Where C-SDS's guidance pulls the student, as a table: the student's one-step clips (noise seed 0) and, for
    each re-noising sigma' and CFG w, the C-SDS target (the teacher's CFG x0 guess from the clips re-noised at
    sigma'), each scored like the student. A target with a larger `ratio` (mean displacement over the real one)
    than the student's pulls it faster at that sigma'; the target's FD is what that pull does to appearance."""
    _, cond, neg, real, captions, real_along = eval_set(latents, combos, seed)
    vae, teacher = WanVAE.from_pretrained(os.path.join(ckpt, sample.VAE_FILE)), WanModel.from_pretrained(ckpt)
    x0 = generate(sample.load_dit(ckpt, torch.float32, "cpu", student), "x0", 1, cond, neg, 0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    keys = ("fd", "in_range", "slow", "ratio")
    lines = ["| clips | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s, w in [(None, None)] + [(s, w) for s in sigmas for w in ws]:
        z = x0
        if s is not None:
            z = D.cfg_x0(teacher, (1 - s) * x0 + s * eps, torch.full((len(x0),), s), cond, {"context": neg}, w)
        m = score(decode(vae, z), real, captions, real_along)
        lines.append(f"| {'student' if s is None else f'target, sigma {s}, w {w}'} | " +
                     " | ".join(f"{m[k]:.2f}" for k in keys) + " |")
        log(lines[-1])
    return "\n".join(lines)


def evaluate(ckpt, latents, combos, seed, students, cfg, log, rows=ROWS):
    """Every row of `rows` whose model exists, on the clips of `combos` made with `seed` (the evaluation or the
    validation split), over cfg["noise_seeds"]; plus the real clips through the VAE. students: {run: [student file
    per training seed]}. Returns {row: {"nfe", metric: [[value per noise seed] per training seed]}} and, for the
    strip, the clips of training seed 0 and noise seed 0 of two rows."""
    x, cond, neg, real, captions, real_along = eval_set(latents, combos, seed)
    vae = WanVAE.from_pretrained(os.path.join(ckpt, sample.VAE_FILE))
    teacher = WanModel.from_pretrained(ckpt)
    results = {"real clips through the VAE": {"nfe": "-", **{k: [[v]] for k, v in score(
        decode(vae, x["latent"]), real, captions, real_along).items()}}}
    strip, names = {"real clip": real[:, 0]}, {"teacher, 50 steps + CFG": "teacher\n50 steps + CFG\n100 NFE",
                                                "V-PAE student, 1 step": "V-PAE student\n1 step\n1 NFE"}
    for row, key, sampler, steps, nfe in rows:
        if key != "teacher" and key not in students:
            continue
        t0, res = time.time(), {"nfe": nfe}
        for t, path in enumerate([None] if key == "teacher" else students[key]):
            dit = teacher if path is None else sample.load_dit(ckpt, torch.float32, "cpu", path)
            per = {}
            for seed in cfg["noise_seeds"]:
                videos = decode(vae, generate(dit, sampler, steps, cond, neg, seed))
                for k, v in score(videos, real, captions, real_along).items():
                    per.setdefault(k, []).append(v)
                if t == 0 and seed == cfg["noise_seeds"][0] and row in names:
                    strip[names[row]] = videos
            for k, v in per.items():
                res.setdefault(k, []).append(v)
        results[row] = res
        log(f"eval {row}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in res.items() if k != "nfe") +
            f" ({time.time() - t0:.0f}s)")
    return results, strip


@torch.no_grad()
def backbone_drift(ckpt, students, latents, sigma=0.25):
    """How much D's backbone choice can matter: the EMA student (V-PAE's backbone) against the frozen teacher (the
    ablation's), per student. Returns (weight, features, signal): |EMA - teacher| / |teacher| over all the blocks'
    weights (Frobenius, pooled); the same for their features at distill's default taps, on the real clips of
    `latents` noised at sigma; and, for scale, how far apart the teacher's features of a real clip and of the
    student's sample of its condition are (the difference D has to see), with the same noise."""
    x, ds = load_all(latents)
    batch = D.prepare(x, ds.neg_context, DIT["text_len"], "cpu")
    teacher, cond = WanModel.from_pretrained(ckpt), batch["cond"]
    taps, s = D.tap_blocks(teacher.cfg.num_layers, D.Config.disc_taps), torch.full((len(x["latent"]),), sigma)
    eps = torch.randn(x["latent"].shape, generator=torch.Generator().manual_seed(0))
    feats = lambda m, x0: D.run(m, (1 - sigma) * x0 + sigma * eps, s, cond, taps=taps)[1]  # noqa: E731
    def rel(a, b):  # |a - b| / |b| over lists of tensors, pooled
        return float(sum((u - v).square().sum() for u, v in zip(a, b)) / sum(v.square().sum() for v in b)) ** 0.5

    blocks = lambda m: [p for n, p in m.named_parameters() if n.startswith("blocks.")]  # noqa: E731
    ref, out = feats(teacher, x["latent"]), []
    for path in students:
        st = sample.load_dit(ckpt, torch.float32, "cpu", path)
        fake = generate(st, "x0", 1, cond, batch["neg"]["context"], 0)
        out.append((rel(blocks(st), blocks(teacher)), rel(feats(st, x["latent"]), ref), rel(feats(teacher, fake), ref)))
    return out


def disc_caption(ckpt, distill_dir, latents, sigma=0.25):
    """{run: how much the run's final D uses the caption}: the fraction of the real clips of `latents` that D scores
    higher with their own caption than with the next clip's (the text contexts rolled by one; a tie counts half),
    both at the same noise sigma_d; 0.5 = the caption does not reach D's verdict. The heads come from the run's last
    checkpoint, the backbone is the run's (the EMA, which is its exported student, or the frozen teacher)."""
    import torch.distributed.checkpoint as dcp
    from model import Discriminator
    x, ds = load_all(latents)
    cond = D.prepare(x, ds.neg_context, DIT["text_len"], "cpu")["cond"]
    eps = torch.randn(x["latent"].shape, generator=torch.Generator().manual_seed(0))
    x_d, s = (1 - sigma) * x["latent"] + sigma * eps, torch.full((len(eps),), sigma)
    teacher, out = WanModel.from_pretrained(ckpt), {}
    for run in sorted(os.listdir(distill_dir)) if os.path.isdir(distill_dir) else []:
        ck, student = D.latest_ckpt(os.path.join(distill_dir, run)), os.path.join(distill_dir, run, "student.safetensors")
        if not ck or not os.path.isfile(student):
            continue
        c = argparse.Namespace(**json.load(open(os.path.join(ck, "config.json"))))  # a run's fields, as it wrote them
        heads = Discriminator(teacher.cfg.dim, D.tap_blocks(teacher.cfg.num_layers, c.disc_taps), c.disc_width,
                              c.disc_queries, c.semantic)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"disc": heads.state_dict()}, checkpoint_id=ck, no_dist=True)  # in place, into the heads' tensors
        backbone = teacher if c.disc_backbone == "teacher" else sample.load_dit(ckpt, torch.float32, "cpu", student)
        m = argparse.Namespace(backbone=backbone, disc=heads)
        with torch.no_grad():
            own, other = (D.disc(m, x_d, s, dict(cond, context=ctx)) for ctx in (cond["context"], cond["context"].roll(1, 0)))
        out[run] = float(((own > other).float() + 0.5 * (own == other).float()).mean())
    return out


def frame_strip(strip, path, clips=(0, 1, 12), frames=(0, 4, 8, 12, 16)):
    """A PNG: for each of `clips`, one row per entry of strip (name -> clips), frames side by side, 2x nearest
    upscaled, the name on the left (Pillow comes with imageio)."""
    from PIL import Image, ImageDraw, ImageFont
    font, rows = ImageFont.load_default(size=15), []
    for i in clips:
        for name, videos in strip.items():
            row = np.concatenate([np.pad(videos[i][f], ((1, 1), (1, 1), (0, 0)), constant_values=128)
                                  for f in frames], 1).repeat(2, 0).repeat(2, 1)
            label = Image.new("RGB", (130, row.shape[0]), "white")
            y = row.shape[0] // 2 - 9 * (name.count("\n") + 1)  # the label centred
            ImageDraw.Draw(label).multiline_text((6, y), name, fill="black", font=font)
            rows.append(np.concatenate([np.asarray(label), row], 1))
        rows.append(np.full((8, rows[-1].shape[1], 3), 255, np.uint8))
    imageio.imwrite(path, np.concatenate(rows[:-1]))


def per_seed(results, row, k):
    """One value per training seed: the mean over noise seeds."""
    return np.array([np.mean(v) for v in results[row][k]])


def spread(results, row, k):
    """The std over training seeds (ddof 1); for a row of one model (the teacher, or a single training seed), its
    std over noise seeds instead."""
    v = results[row][k]
    return float(np.std(per_seed(results, row, k), ddof=1)) if len(v) > 1 else float(np.std(v[0]))


def better(results, a, b, k):
    """Row a better than row b on metric k: the means differ in the right direction by more than 2 pooled std,
    pooled = sqrt((s_a^2 + s_b^2) / 2) with s = spread()."""
    d = METRICS[k][2] * (per_seed(results, a, k).mean() - per_seed(results, b, k).mean())
    return bool(d > 2 * np.sqrt((spread(results, a, k) ** 2 + spread(results, b, k) ** 2) / 2))


def checks(results):
    """The expected orderings that these results can test, each (statement, held). See better() for the test."""
    m = lambda row, k: float(per_seed(results, row, k).mean())  # noqa: E731
    s1, t100, out = "V-PAE student, 1 step", "teacher, 50 steps + CFG", []

    def beats(name, a, b):  # row a ahead of row b on at least one metric and behind on none
        ahead, behind = ([k for k in METRICS if better(results, x, y, k)] for x, y in ((a, b), (b, a)))
        return (f"{name} beats {b} on at least one metric and is behind on none (ahead: {', '.join(ahead) or '-'}; "
                f"behind: {', '.join(behind) or '-'})", bool(ahead) and not behind)

    if "full, 1 step" in results:  # --sweep, by the rule fixed before round 3 ran: a candidate replaces the default
        for row in (r for r in results if r.startswith("sweep_")):  # when its speeds are nearer the real ones (W1), and
            worse = [k for k in METRICS if better(results, "full, 1 step", row, k)]  # it is worse on no metric
            out.append((f"{row} beats the default on speed W1 and is worse on none (worse: {', '.join(worse) or '-'})",
                        better(results, row, "full, 1 step", "w1") and not worse))
        for row in (r for r in results if r.endswith(", 4 steps") and r[:-9] + ", 1 step" in results):
            one = row[:-9] + ", 1 step"  # the few-step rule (#28), fixed before its runs: every metric's mean at least
            worse = [k for k in METRICS if METRICS[k][2] * (m(row, k) - m(one, k)) < 0]  # as good as in 1 step
            out.append((f"{row} at least as good as in 1 step on every metric's mean (worse: {', '.join(worse) or '-'})",
                        not worse))
    if s1 not in results:
        return out
    for t in ("teacher, 1 step + CFG", "teacher, 1 step, no CFG"):
        if t in results:
            out.append((f"student 1 step beats {t} on FD ({m(s1, 'fd'):.2f} vs {m(t, 'fd'):.2f})", better(results, s1, t, "fd")))
    c = "ablation: lambda_adv = 0 (C-SDS alone), 1 step"
    if c in results:
        for k in ("fd", "w1", "in_range"):
            out.append((f"V-PAE beats C-SDS alone on {k} ({m(s1, k):.2f} vs {m(c, k):.2f})", better(results, s1, c, k)))
    for row in (r for r in results if r.startswith("ablation") and r != c):
        worse = [k for k in METRICS if better(results, s1, row, k)]
        out.append((f"{row} worse than V-PAE on at least one metric ({', '.join(worse) or 'none'})", bool(worse)))
    for row in (r for r in results if r.startswith(tuple(PEER_NAMES.values()))):
        out.append(beats("V-PAE", s1, row))
    for a, b in [(a, b) for a in results for b in results if a.startswith(PEER_NAMES["adv_only"]) and  # the paper's
                 b.startswith(PEER_NAMES["dmd2"] + ",") and ("time" in a) == ("time" in b)]:  # APT over DMD2, paired
        out.append(beats(a, a, b))
    if t100 in results:
        for k in ("motion", "in_range"):
            out.append((f"student {k} at least 0.9x the 100-NFE teacher's ({m(s1, k):.2f} vs {m(t100, k):.2f})",
                        m(s1, k) >= 0.9 * m(t100, k)))
    if len(results[s1]["fd"]) > 1:
        out.append((f"student FD std over training seeds at most 10% of its mean ({spread(results, s1, 'fd'):.2f} vs "
                    f"{m(s1, 'fd'):.2f})", spread(results, s1, "fd") <= 0.1 * m(s1, "fd")))
    return out


# -----------------------------------------------------------------------------
# report, assets, main


def machine():
    try:  # "-dirty" when the working tree differs from the commit
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "commit": commit}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


CHANCE = 0.6  # a discriminator whose best held-out accuracy at the end of Phase II is below this is "at chance"


def disc_health(distill_dir, caption=None):
    """{run: summary of its Phase II from log.jsonl}: the hinge loss over the first and the last quarter of the
    logged steps (2 = chance), D(real) - D(fake), the final held-out accuracy at each fixed sigma_d, the ratio
    of the norms of the adversarial and the C-SDS gradients at x0_hat (how hard each term pushes G), and the
    run's entry of caption (disc_caption), if given."""
    stats = {}
    for run in sorted(os.listdir(distill_dir)) if os.path.isdir(distill_dir) else []:
        path = os.path.join(distill_dir, run, "log.jsonl")
        steps = [e for e in map(json.loads, open(path)) if e["phase"] == 2] if os.path.isfile(path) else []
        if not steps:
            continue
        q = max(1, len(steps) // 4)
        mean = lambda k, es=steps: float(np.mean([e[k] for e in es]))  # noqa: E731
        evals = [e for e in steps if any(k.startswith("val_acc@") for k in e)]  # the last held-out evaluation
        acc = {k[8:]: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("val_acc@")}
        stats[run] = {"hinge_first": mean("loss_d", steps[:q]), "hinge_last": mean("loss_d", steps[-q:]),
                      "margin": mean("d_real") - mean("d_fake"), "acc": acc,
                      "grad_ratio": float(np.mean([e["gx_adv"] / e["gx_csds"] for e in steps]))  # nan: no C-SDS
                      if all(e["gx_csds"] > 0 for e in steps) else float("nan"),
                      "at_chance": bool(acc) and max(acc.values()) < CHANCE,
                      "caption_acc": (caption or {}).get(run, float("nan"))}
    return stats


def fmt_row(results, row):
    """'mean ± sd [noise sd]' per metric: sd over training seeds, and the mean std over noise seeds beside it."""
    cells = []
    for k, (_, d, _) in METRICS.items():
        v = results[row][k]
        noise = np.mean([np.std(x) for x in v])
        cells.append(f"{per_seed(results, row, k).mean():.{d}f}" + (f" ± {spread(results, row, k):.{d}f}" if len(v) > 1 else "")
                     + (f" [{noise:.{d}f}]" if len(v[0]) > 1 else ""))
    return f"| {row} | {results[row]['nfe']} | " + " | ".join(cells) + " |"


def report(results, times, argv, out, distill_dir, name="results", drift=(), caption=None):
    info = machine()
    lines = [f"command: `python toy.py {' '.join(argv)}`  ",
             f"machine: {info['cpus']} CPU cores ({info['cpu']}), torch {info['torch']}, {info['threads']} threads; "
             f"commit {info['commit']}  ",
             "wall clock: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), "",
             "| model | NFE | " + " | ".join(c for c, _, _ in METRICS.values()) + " |", "|---|---|" + "---|" * len(METRICS)]
    lines += [fmt_row(results, row) for row in results]
    held = checks(results)
    lines += ["", "mean ± std over training seeds [mean std over noise seeds]; an ordering holds when the means differ "
              "by more than 2 pooled std over training seeds (over noise seeds for a single model):"]
    lines += [f"- {'held' if ok else 'DID NOT HOLD'}: {s}" for s, ok in held]
    s1 = "V-PAE student, 1 step"
    paired = [r for r in results if r.startswith("ablation") and s1 in results and len(results[r]["fd"]) > 1]
    if paired:  # not the test above: rows of one training seed share its Phase I, so differences can be paired
        lines += ["", "Per training seed, each ablation minus V-PAE (rows of one seed share its Phase I; a description, "
                  "not the test above):", ""]
        lines += [f"- {r}: " + "; ".join(f"{k} " + ", ".join(f"{d:+.2f}" for d in per_seed(results, r, k) - per_seed(
            results, s1, k)) for k in ("fd", "w1", "in_range")) for r in paired]
    lines += [] if not drift else ["", "D's backbone, EMA student against frozen teacher (backbone_drift, validation "
                                   "clips at sigma_d 0.25), per training seed: weights apart / tapped features apart / "
                                   "teacher's features of real vs generated clips apart, each relative to the norm: " +
                                   "; ".join(" / ".join(f"{v:.3f}" for v in d) for d in drift)]
    health = disc_health(distill_dir, caption) if distill_dir else {}
    sig = sorted({k for v in health.values() for k in v["acc"]}, key=float)
    lines += [] if not health else [
              "", "Phase II of each distillation run (log.jsonl): hinge loss over the first and last quarter (2 = chance), "
              "D(real) - D(fake), held-out accuracy at each sigma_d at the end, |grad adv| / |grad C-SDS| at x0_hat, the final "
              "D's caption accuracy (disc_caption: own caption over another's, real validation clips, sigma_d 0.25):", "",
              "| run | hinge first → last | D(real) - D(fake) | " + " | ".join(f"acc σ={s}" for s in sig) +
              " | grad ratio | caption acc | |", "|---|---|---|" + "---|" * len(sig) + "---|---|---|"]
    lines += [f"| {run} | {v['hinge_first']:.3f} → {v['hinge_last']:.3f} | {v['margin']:.3f} | " +
              " | ".join(f"{v['acc'].get(s, float('nan')):.2f}" for s in sig) +
              f" | {v['grad_ratio']:.3f} | {v['caption_acc']:.2f} | {'D AT CHANCE' if v['at_chance'] else ''} |"
              for run, v in health.items()]
    if any(v["at_chance"] for v in health.values()):
        lines += ["", f"D AT CHANCE: the run's best held-out accuracy at the end of Phase II is below {CHANCE}: its D no "
                  "longer tells real clips from generated ones it has not trained on (see EXPERIMENTS.md)"]
    text = "\n".join(lines) + "\n"
    data.write_text(text, os.path.join(out, name + ".md"))
    data.write_json({"argv": argv, "machine": info, "times_s": times, "results": results, "checks": held,
                     "disc_health": health}, os.path.join(out, name + ".json"))
    print(text + f"wrote {os.path.join(out, name)}.md and .json")
    return held


LORA_RANKS = (16, 64)  # --lora-table, and full rank (the model width)


def lora_error(teacher, student, merged):
    """|merged - student| / |student - teacher| (Frobenius, pooled) over the Linear weights of the blocks."""
    num = den = 0.0
    for (name, s), m, t in zip(student.named_parameters(), merged.parameters(), teacher.parameters()):
        if name.startswith("blocks.") and s.dim() == 2:  # the blocks' only 2-D parameters are Linear weights
            num, den = num + (m - s).double().square().sum(), den + (s - t).double().square().sum()
    return float(num / den) ** 0.5


def lora_table(ckpt, students, out, log):
    """--lora-table: each student exported as a LoRA of the teacher (distill.py --export_lora) at LORA_RANKS and
    full rank, merged back as sample.py --lora does, into OUT/lora/s<seed>/ (rebuilt on each call: seconds, and never
    stale). Returns {run: [merged file per student]} and the evaluation rows, whose names carry the file size and
    the weight error (lora_error)."""
    shutil.rmtree(os.path.join(out, "lora"), ignore_errors=True)
    teacher, runs = WanModel.from_pretrained(ckpt), {"full": students}
    rows = [("V-PAE student, 1 step", "full", "x0", 1, 1)]
    for r in sorted({min(r, teacher.cfg.dim) for r in (*LORA_RANKS, teacher.cfg.dim)}):
        runs[f"lora{r}"], err = [], []
        for t, path in enumerate(students):
            d = os.path.join(out, "lora", f"s{t}")
            lora, merged = (os.path.join(d, f"{f}{r}.safetensors") for f in ("student_lora_rank", "merged_rank"))
            os.makedirs(d, exist_ok=True)
            shutil.copy(path, os.path.join(d, "student.safetensors"))
            with contextlib.redirect_stdout(io.StringIO()):
                D.main([f"--teacher={ckpt}", f"--out={d}", f"--export_lora={r}", "--export_dtype=fp32"])
            model = sample.load_dit(ckpt, torch.float32, "cpu", loras=[(lora, 1.0)])
            err.append(lora_error(teacher, sample.load_dit(ckpt, torch.float32, "cpu", path), model))
            save_state(model.state_dict(), merged)
            runs[f"lora{r}"].append(merged)
        name = f"LoRA rank {r}{' (full)' if r == teacher.cfg.dim else ''}, {os.path.getsize(lora) / 2**20:.1f} MiB, " \
               f"weight error {np.mean(err):.3f}, 1 step"
        rows.append((name, f"lora{r}", "x0", 1, 1))
        log(f"{name}: weight error per student " + ", ".join(f"{e:.4f}" for e in err))
    # the full-rank LoRA as diffusers loads it: its Wan converter drops every difference but the Linears' (norms,
    # modulations, patch embedding; it logs that it does)
    lin = {n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)}
    t_sd, runs["diffusers"] = teacher.state_dict(), []
    for merged in runs[rows[-1][1]]:
        sd = WanModel.from_pretrained(ckpt, weights=merged).state_dict()
        runs["diffusers"].append(merged.replace("merged_rank", "diffusers_rank"))
        save_state({k: v if k.rpartition(".")[0] in lin else t_sd[k] for k, v in sd.items()}, runs["diffusers"][-1])
    rows.append(("LoRA full rank, what diffusers keeps of it, 1 step", "diffusers", "x0", 1, 1))
    return runs, rows


def save_state(sd, path):
    data.atomic(path, lambda f: save_file({k: v.contiguous() for k, v in sd.items()}, f))


def export_assets(out):
    """The demo in the official layout under assets/demo, plus assets/example.png and assets/strip.png."""
    demo = os.path.join(ROOT, "assets", "demo")
    shutil.rmtree(demo, ignore_errors=True)
    shutil.copytree(os.path.join(out, "ckpt"), demo)
    shutil.copy(os.path.join(out, "distill", "full_s0", "student.safetensors"), os.path.join(demo, "student.safetensors"))
    cfg = json.load(open(os.path.join(demo, "config.json")))
    cfg["vpae_demo"] = {"student": "student.safetensors", "frames": FRAMES, "size": f"{SIZE}*{SIZE}", "shift": SHIFT,
                        "guide_scale": GUIDE, "prompt": "a red circle moving right"}  # sample.py's defaults
    data.write_json(cfg, os.path.join(demo, "config.json"))
    imageio.imwrite(os.path.join(ROOT, "assets", "example.png"), make_clips([("circle", "red", "right")], 7)[0][0, 0, 0])
    shutil.copy(os.path.join(out, "strip.png"), os.path.join(ROOT, "assets", "strip.png"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ROOT, "assets")) for f in fs)
    print(f"wrote assets/ ({size / 2**20:.1f} MiB)")


SWEEP = {  # --sweep: candidate Phase II settings, each run over the training seeds and judged on the validation split
    # round 1, from the old default (a fixed disc_shift 5, disc_shift_ref=0)
    "fixed_shift5": ["--disc_shift_ref=0"], "disc_shift1": ["--disc_shift=1", "--disc_shift_ref=0"],
    "disc_shift_res": ["--disc_shift=5", "--disc_shift_ref=32760"], "r1_0.1": ["--lambda_r1=0.1", "--disc_shift_ref=0"],
    "disc_steps2": ["--disc_steps=2", "--disc_shift_ref=0"], "frozen_g": ["--lr_phase2=0", "--disc_shift_ref=0"],
    "frozen_g_shift1": ["--lr_phase2=0", "--disc_shift=1", "--disc_shift_ref=0"],  # can D tell a fixed G apart?
    # round 2, on top of the resolution-scaled shift (the default since round 1)
    "res_r1_0.1": ["--lambda_r1=0.1"], "res_lr_disc_1e-4": ["--lr_disc=1e-4"], "res_taps6": ["--disc_taps=6"],
    "res_queries16": ["--disc_queries=16"], "res_phase2_600": ["--phase2_steps=600"],
    # round 3, at Phase II 600 (the default since round 2), aimed at the student's speed: C-SDS pulls x0_hat towards
    # the teacher's denoised guess of it re-noised, which at high sigma' is the mean over futures (slow, blurred)
    "csds_3": ["--lambda_csds=3"],  # less of that pull, relatively more of D's
    "csds_shift1": ["--shift=1"],  # Phase II's C-SDS re-noised at shift 1 (median sigma' 0.5, not 0.75); Phase I as before
    # round 4: neither moved the speed; the student is too slow (never too fast), as the 2-NFE teacher is, and 300 -> 600
    # steps helped: is Phase II still converging? (the paper's 1000 steps; or the same steps at 3x the lr)
    "phase2_1000": ["--phase2_steps=1000"], "lr_phase2_3e-5": ["--lr_phase2=3e-5"],  # both passed; 3e-5 is the recipe's
    "lr_phase2_1e-5": ["--lr_phase2=1e-5"],  # the recipe before round 4, for comparison
    # round 5: phase2_1000 at lr 3e-5 bettered every seed but failed the rule: seed 1's D broke away (D(real) - D(fake)
    # 0.97, as in every no-semantic-head run, whose students are worse). Does a stronger R1, or a slower D, stop that?
    "r1_10": ["--lambda_r1=10"],  # and res_lr_disc_1e-4 (round 2). Both stopped it; neither passed the rule
    # round 6: C-SDS's target is the teacher's CFG guess; like SDS, a low guidance scale pulls towards the mean over
    # futures (slow). A stronger guidance in Phase II's target only (Phase I and the teacher rows stay at 3); if both
    # pass the round-3 rule, the lower W1 wins. Neither passed
    "csds_guide_7.5": ["--guide_scale=7.5"], "csds_guide_10": ["--guide_scale=10"],
    # round 7: both reached the teacher's speed but failed on FD and PSNR. Is there a guidance between that keeps the
    # appearance, or can D repair it when C-SDS weighs less against it? Neither: both failed on FD and PSNR
    "csds_guide_6": ["--guide_scale=6"], "csds_guide_7.5_csds_3": ["--guide_scale=7.5", "--lambda_csds=3"],
    # round 8: a guidance interval. w 7.5 at half of C-SDS's sigma' only (split at the median, 0.75), the recipe's w 3
    # (GUIDE) at the other half; with round 6's w 7.5 at all sigma' and the recipe's at none, a 2x2: which half buys
    # the speed, which costs the FD? The round-3 rule, fixed before the runs. _low passed and is the recipe since (rounds
    # 1-8 ran without it); the field was then turned round (csds_guide_from -> csds_guide_until): the same w as run
    "csds_guide_7.5_high": ["--guide_scale=7.5", f"--csds_guide_scale={GUIDE}", "--csds_guide_until=0.75"],
    "csds_guide_7.5_low": ["--csds_guide_scale=7.5", "--csds_guide_until=0.75"],
    # round 9: phase2_1000 again, on top of the round-8 recipe (the 600-step runs continued: same streams, constant lr)
    # round 10 (#28's few steps): G trained at the 4-step sampler's input sigmas too, each clip at one of the four.
    # At Phase II 1000 its 4-step FD was still worse than its 1-step one, and its 1-step worse than the recipe's
    "student_steps4": ["--student_steps=4"],
    # round 11: round 10 fed G the real clip noised where sampling feeds it its own earlier guess re-noised. DMD2's
    # backward simulation feeds it the latter (3 more no-grad forwards of G per sample). Its 4-step student passed the
    # few-step rule (FD 8.83 against 10.66 for round 10's); its 1-step one is worse than the recipe's on FD and PSNR
    "backward_sim4": ["--student_steps=4", "--backward_sim=1"],
}


def step_seconds(ckpt, latents, out, names, log):
    """Seconds per step of V-PAE's Phase I and Phase II and of each peer in `names`, measured alike for the
    equal-time rows: 20 steps of each, two one-thread runs at a time as the table's runs are, nothing else running,
    the last 10 steps timed (the first 10 warm up). Written to out/step_seconds.json once, then read from it."""
    path = os.path.join(out, "step_seconds.json")
    if os.path.isfile(path):
        return json.load(open(path))
    argv = {"vpae": ["--phase1_steps=20", "--phase2_steps=20"], **{k: PEERS[k](20) + PEER_RECIPE[k] for k in names}}
    shutil.rmtree(os.path.join(out, "timing"), ignore_errors=True)
    pool({f"timing {k}": (os.path.join(out, "timing", k, "student.safetensors"),
                          (ckpt, latents, "", os.path.join(out, "timing", k), a + ["--log_every=10"],
                           os.path.join(out, "logs", f"timing_{k}.log"), None, None)) for k, a in argv.items()}, 2, {}, log)
    secs = {}
    for k in argv:
        lines = {e["step"]: e["step_s"] for e in map(json.loads, open(os.path.join(out, "timing", k, "log.jsonl")))}
        secs |= {"vpae_phase1": lines[20], "vpae_phase2": lines[40]} if k == "vpae" else {k: lines[20]}
    log("seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in secs.items()))
    data.write_json(secs, path)
    return secs


def equal_time_step(secs, peer, phase1, phase2, every=100):
    """The peer's last checkpoint step (a multiple of `every`) within V-PAE's training time at phase1 + phase2 steps,
    at most phase1 + phase2 (the peer's budget of steps: a faster peer is not run longer)."""
    budget = phase1 * secs["vpae_phase1"] + phase2 * secs["vpae_phase2"]
    return min(phase1 + phase2, int(budget / secs[peer]) // every * every)


def exported(run, step):
    """The EMA of the run's checkpoint at `step`, exported once as run/student_<step>.safetensors (distill.py
    --export_from)."""
    f = os.path.join(run, f"student_{step:08d}.safetensors")
    if not os.path.isfile(f):
        with contextlib.redirect_stdout(io.StringIO()):
            D.main([f"--export_from={os.path.join(run, f'ckpt_{step:08d}')}", "--export_dtype=fp32"])
    return f


def peer_choice(results):
    """--peer-sweep's rule, fixed before its runs: among each peer's candidates, the one with the best mean rank over
    the six metrics on the validation split (means over seeds), ties to the lower FD. Returns lines to print."""
    lines = []
    for peer in dict.fromkeys(p for p, _ in PEER_SWEEP.values()):
        rows = [f"psweep_{k}, 1 step" for k, (p, _) in PEER_SWEEP.items() if p == peer and f"psweep_{k}, 1 step" in results]
        if len(rows) < 2:
            continue
        mean = {r: {k: per_seed(results, r, k).mean() for k in METRICS} for r in rows}
        rank = {r: np.mean([1 + sum(METRICS[k][2] * (mean[o][k] - mean[r][k]) > 0 for o in rows) for k in METRICS])
                for r in rows}
        order = sorted(rows, key=lambda r: (rank[r], mean[r]["fd"]))
        lines.append(f"- {peer}: " + "; ".join(f"{r.split(', ')[0][7:]} {rank[r]:.2f}" for r in order) +
                     f" (mean rank; chosen: {order[0].split(', ')[0][7:]})")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI: distil the bundled demo teacher briefly, check the ordering")
    p.add_argument("--export-assets", action="store_true", help="after the pipeline, copy its models into assets/")
    p.add_argument("--train-teacher", action="store_true", help="train the VAE and the teacher (and write the random "
                   "encoders) here, about 19 min, instead of copying the bundled ones from assets/demo")
    p.add_argument("--sweep", nargs="?", const=",".join(SWEEP), metavar="NAMES",
                   help="instead of the table: the SWEEP candidates (all, or these, comma-separated) on the validation split")
    p.add_argument("--on-eval", action="store_true", help="with --sweep: the candidates' finished runs on the evaluation"
                   " split instead, into sweep_eval.md, to report a candidate once validation has chosen it")
    p.add_argument("--lora-table", action="store_true", help="instead of the table: the V-PAE students of an earlier"
                   " run (--quick: the bundled one) as LoRAs of the teacher at ranks 16, 64 and full, on the eval split")
    p.add_argument("--csds-pull", metavar="STUDENT", help="instead of the table: the C-SDS targets of this student "
                   "file at each sigma' and w, scored on the validation split, into csds_pull.md")
    p.add_argument("--peers", nargs="?", const=",".join(PEERS), metavar="NAMES", help="instead of the table: V-PAE "
                   f"beside the peer methods ({', '.join(PEERS)}; default all) on the eval split, at equal generator "
                   "steps and at equal training time")
    p.add_argument("--peer-sweep", nargs="?", const=",".join(PEER_SWEEP), metavar="NAMES", help="instead of the "
                   "table: the PEER_SWEEP candidates (all, or these) on the validation split, ranked per peer")
    p.add_argument("--trajectory", metavar="RUNS", help="instead of the table: every checkpoint of these run folders "
                   "(comma-separated, under --out) on the validation split, each checkpoint's EMA exported once")
    p.add_argument("--runs", default=",".join(RUNS), metavar="NAMES", help="the table's distilled runs (default all: "
                   f"{','.join(RUNS)}); the rows of the others are left out")
    p.add_argument("--seeds", type=int, help="training seeds per distilled row (default 3; --quick 1)")
    p.add_argument("--phase2", type=int, metavar="N", help="Phase II steps of every distilled run (default 1000; --quick"
                   " 80); finished runs in --out are reused, and one of another length stops it")
    p.add_argument("--jobs", type=int, default=2, help="distillation runs at a time, each on cores/jobs threads (default 2:"
                   " on 2 cores, two one-thread runs do 1.85x the work of one two-thread run)")
    p.add_argument("--out", help="output folder (default run/toy, or run/toy-quick)")
    args = p.parse_args(argv)
    if args.on_eval and not args.sweep:
        p.error("--on-eval reports --sweep candidates: give --sweep NAMES with it")
    if args.sweep and not set(args.sweep.split(",")) <= set(SWEEP):
        p.error(f"--sweep {args.sweep}: the candidates are {', '.join(SWEEP)}")
    for flag, names, known in (("--peers", args.peers, PEERS), ("--peer-sweep", args.peer_sweep, PEER_SWEEP)):
        if names and not set(names.split(",")) <= set(known):
            p.error(f"{flag} {names}: a comma-separated subset of {', '.join(known)}")
    if "full" not in args.runs.split(",") or not set(args.runs.split(",")) <= set(RUNS):
        p.error(f"--runs {args.runs}: a comma-separated subset of {', '.join(RUNS)} that includes full")
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["train_seeds"] = tuple(range(args.seeds)) if args.seeds > 0 else p.error(f"--seeds {args.seeds}: give 1 or more")
    if args.phase2 is not None:
        cfg["phase2"] = args.phase2 if args.phase2 > 0 else p.error(f"--phase2 {args.phase2}: give a positive step count")
    out = os.path.abspath(args.out or os.path.join(ROOT, "run", "toy-quick" if args.quick else "toy"))
    students = [os.path.join(ROOT, "assets", "demo", "student.safetensors")] if args.quick else [
        os.path.join(out, "distill", f"full_s{t}", "student.safetensors") for t in cfg["train_seeds"]]
    if args.lora_table and not all(map(os.path.isfile, students)):
        sys.exit(f"toy.py --lora-table: {next(s for s in students if not os.path.isfile(s))} not found: run "
                 f"`python toy.py{' --export-assets' if args.quick else ''}` first")
    if args.csds_pull and not os.path.isfile(args.csds_pull):
        sys.exit(f"toy.py --csds-pull: {args.csds_pull} not found: give a student.safetensors of a run in --out")
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    times, t_all = {}, time.time()

    def log(msg):
        print(f"[{time.time() - t_all:7.1f}s] {msg}", flush=True)

    def stage(name, done, fn):
        """Run fn unless `done` exists; its stdout goes to logs/<name>.log."""
        if os.path.exists(done):
            return log(f"{name}: done before, skipped")
        t0 = time.time()
        with open(os.path.join(out, "logs", name + ".log"), "a") as f, contextlib.redirect_stdout(f):
            fn()
        times[name] = time.time() - t0
        log(f"{name}: {times[name]:.0f}s")

    if args.quick:
        ckpt = os.path.join(ROOT, "assets", "demo")
        if not os.path.isfile(os.path.join(ckpt, "diffusion_pytorch_model.safetensors")):
            sys.exit("toy.py --quick distils the bundled demo teacher: run `python toy.py --export-assets` first")
    else:
        ckpt = os.path.join(out, "ckpt")
        os.makedirs(ckpt, exist_ok=True)
        dit_file = os.path.join(ckpt, "diffusion_pytorch_model.safetensors")
        data.write_json({"_class_name": "WanModel", "_diffusers_version": "0.30.0", **DIT},
                        os.path.join(ckpt, "config.json"))
        if not args.train_teacher and not os.path.exists(dit_file):
            if os.path.exists(os.path.join(ckpt, sample.VAE_FILE)):
                sys.exit(f"toy.py: {ckpt} holds a VAE trained here but no teacher yet: add --train-teacher to go on")
            stage("bundled teacher", dit_file, lambda: copy_bundled(ckpt))
        stage("encoders", os.path.join(ckpt, sample.T5_FILE), lambda: write_encoders(ckpt))
        stage("vae", os.path.join(ckpt, sample.VAE_FILE),
              lambda: train_vae(os.path.join(ckpt, sample.VAE_FILE), cfg["vae_steps"], lambda m: print(m, flush=True)))
    seen = [k for k in COMBOS if k not in HELD_OUT]
    sets = {"train": ([seen[i] for i in np.random.default_rng(0).integers(len(seen), size=cfg["train_clips"])], 0, 1),
            "eval": (eval_combos(cfg["eval_clips"]), EVAL_SEED, EVAL_SPEEDS),
            "val": (eval_combos(cfg["eval_clips"], seed=2), VAL_SEED, EVAL_SPEEDS)}
    for name, (combos, seed, speeds) in sets.items() if not args.lora_table else [("eval", sets["eval"])]:
        videos, latents = os.path.join(out, f"{name}_videos"), os.path.join(out, f"{name}_latents")
        stage(f"{name} clips", os.path.join(videos, "captions.jsonl"),
              lambda: write_videos(videos, *make_clips(combos, seed, speeds)))
        stage(f"{name} precompute", os.path.join(latents, "neg_context.safetensors"),
              lambda: data.precompute(ckpt, videos, latents, FRAMES, f"{SIZE}*{SIZE}", "cpu"))
    train_lat, val_lat = os.path.join(out, "train_latents"), os.path.join(out, "val_latents")
    if not args.quick:
        stage("teacher", dit_file,
              lambda: train_teacher(ckpt, train_lat, cfg["teacher_steps"], lambda m: print(m, flush=True)))

    def table(split, students, rows, name, t0, distill_dir=None, drift=()):
        """The rows on the clips of split ("val" to choose settings, "eval" for the tables), into out/<name>.md, .json."""
        results, _ = evaluate(ckpt, os.path.join(out, f"{split}_latents"), sets[split][0], sets[split][1], students, cfg,
                              log, rows)
        times["eval"], times["total"] = time.time() - t0, time.time() - t_all
        report(results, times, argv, out, distill_dir, name, drift)
        return results

    if args.csds_pull:
        pull = csds_pull(ckpt, args.csds_pull, val_lat, sets["val"][0], VAL_SEED, log)
        i = machine()
        data.write_text(f"`python toy.py {' '.join(argv)}`: {i['cpus']} CPU cores ({i['cpu']}), torch {i['torch']}, "
                        f"commit {i['commit']}\n\n{pull}\n", os.path.join(out, "csds_pull.md"))
        return pull
    if args.trajectory:
        t0, students, rows = time.time(), {}, [r for r in ROWS if r[0] == "teacher, 1 step, no CFG"]
        for run in args.trajectory.split(","):
            path = os.path.join(out, run)
            for c in D.ckpts(path) or sys.exit(f"toy.py --trajectory: no checkpoint in {path}"):
                students[f"{run}@{c[5:]}"] = [exported(path, int(c[5:]))]
                rows.append((f"{run} at step {int(c[5:])}, 1 step", f"{run}@{c[5:]}", "x0", 1, 1))
        return table("val", students, rows, "trajectory", t0)
    if args.lora_table:
        t0 = time.time()
        runs, rows = lora_table(ckpt, students, out, log)
        times["export"], t0 = time.time() - t0, time.time()
        return table("eval", runs, rows, "lora_table", t0)

    steps = [f"--phase1_steps={cfg['phase1']}", f"--phase2_steps={cfg['phase2']}"]
    runs = {"full": []} if args.quick else {"full": [], **{f"sweep_{k}": SWEEP[k] for k in args.sweep.split(",")}} \
        if args.sweep else {k: RUNS[k] for k in args.runs.split(",")}  # a sweep is judged against the default: the
    # table's own "full" runs, reused
    n_gen = cfg["phase1"] + cfg["phase2"]  # V-PAE's generator steps: each peer's budget
    if args.peers:  # every 100 steps a checkpoint, for the students at equal training time
        runs = {"full": [], **{f"peer_{k}": PEERS[k](n_gen) + PEER_RECIPE[k] + ["--ckpt_every=100", "--keep_ckpts=1000"]
                               for k in args.peers.split(",")}}
    if args.peer_sweep:
        runs = {"full": [], **{f"psweep_{k}": PEERS.get(p, lambda n: [])(n_gen) + extra + ["--ckpt_every=100",
                                                                                            "--keep_ckpts=1000"]
                               for k, (p, extra) in ((k, PEER_SWEEP[k]) for k in args.peer_sweep.split(","))}}
    d = os.path.join(out, "sweep" if args.sweep else "peers" if args.peers or args.peer_sweep else "distill")
    jobs = 1 if args.quick else args.jobs
    where = lambda k: os.path.join(out, "distill") if k == "full" else d  # noqa: E731

    logf = lambda name: os.path.join(out, "logs", f"distill_{name}.log")  # noqa: E731
    shared = {t: os.path.join(out, "phase1", f"s{t}", f"ckpt_{cfg['phase1']:08d}") for t in cfg["train_seeds"]}
    if not args.quick:  # Phase I: once per training seed, shared by the runs of that seed
        pool({f"distill phase1 s{t}": (p, (ckpt, train_lat, val_lat, os.path.dirname(p), steps + [f"--seed={t}"],
                                           logf(f"phase1_s{t}"), None, cfg["phase1"])) for t, p in shared.items()},
             jobs, times, log)
    pool({f"distill {k} s{t}": (os.path.join(where(k), f"{k}_s{t}", "student.safetensors"),
                                (ckpt, train_lat, val_lat, os.path.join(where(k), f"{k}_s{t}"), steps + extra + [f"--seed={t}"],
                                 logf(f"{k}_s{t}"), None if args.quick or "--phase1_steps=0" in extra or
                                 k.startswith(("peer_", "psweep_")) else p, None))
          for t, p in shared.items() for k, extra in runs.items()}, jobs, times, log)

    t0 = time.time()
    students = {k: [os.path.join(where(k), f"{k}_s{t}", "student.safetensors") for t in cfg["train_seeds"]] for k in runs}
    if args.peer_sweep:  # each candidate's student on the validation split, ranked among its peer's candidates
        rows = [r for r in ROWS if r[0] == "teacher, 1 step, no CFG"]  # for scale
        rows += [(f"{k}, 1 step", k, "x0", 1, 1) for k in runs]
        results = table("val", students, rows, "peer_sweep", t0)
        choice = "\n".join(["Each peer's candidates by mean rank over the six metrics (peer_choice):"] + peer_choice(results))
        print(choice)
        with open(os.path.join(out, "peer_sweep.md"), "a") as f:
            f.write("\n" + choice + "\n")
        return results
    if args.peers:  # the table: V-PAE and each peer at equal generator steps, and each peer at V-PAE's training time
        rows = [r for r in ROWS if r[1] in ("teacher", "full") and r[4] < 100] + [  # the 100-NFE teacher: in the table
            (f"{PEER_NAMES[k[5:]]}, {n_gen} steps, 1 step", k, "x0", 1, 1) for k in runs if k != "full"]
        secs = step_seconds(ckpt, train_lat, out, [k[5:] for k in runs if k != "full"], log)
        for k in [k for k in runs if k != "full"]:
            n = equal_time_step(secs, k[5:], cfg["phase1"], cfg["phase2"])
            students[k + "@time"] = [exported(os.path.join(d, f"{k}_s{t}"), n) for t in cfg["train_seeds"]]
            rows.append((f"{PEER_NAMES[k[5:]]}, V-PAE's time ({n} steps), 1 step", k + "@time", "x0", 1, 1))
        return table("eval", students, rows, "peers", t0)
    if args.sweep:  # the student of each candidate, on the validation split only
        rows = [r for r in ROWS if r[0] in ("teacher, 4 steps + CFG", "teacher, 1 step + CFG")]  # for scale (the 4-step
        # teacher is at the 100-NFE one's FD on the eval split, at a twelfth of its cost)
        rows += [(f"{k}, {n} step{'s' * (n > 1)}", k, "x0", n, n) for k in runs for n in (1, 4)]
        return table("eval" if args.on_eval else "val", students, rows, "sweep_eval" if args.on_eval else "sweep", t0,
                     d, backbone_drift(ckpt, students["full"], val_lat))
    results, strip = evaluate(ckpt, os.path.join(out, "eval_latents"), sets["eval"][0], EVAL_SEED, students, cfg, log,
                              QUICK_ROWS if args.quick else ROWS)
    frame_strip(strip, os.path.join(out, "strip.png"))
    drift = [] if args.quick else backbone_drift(ckpt, students["full"], val_lat)
    caption = disc_caption(ckpt, d, val_lat)
    times["eval"] = time.time() - t0
    times["total"] = time.time() - t_all
    held = report(results, times, argv, out, d, drift=drift, caption=caption)
    if args.export_assets:
        export_assets(out)
    failed = [s for s, ok in held if not ok]
    if args.quick and failed:  # every ordering --quick prints is one it must pass
        sys.exit("toy.py --quick: ordering check failed: " + "; ".join(failed))
    return results


if __name__ == "__main__":
    main()
