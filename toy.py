"""A toy benchmark of V-PAE on synthetic moving shapes, and the bundled demo model (assets/demo).

  python toy.py                    # the whole pipeline into run/toy: results.md, results.json, strip.png
  python toy.py --export-assets    # the same (finished stages are reused), then copy the models into assets/
  python toy.py --controls         # the same, plus controls: no adversarial term, training seed 1, disc_shift 1
  python toy.py --quick            # CI, a few minutes: a short distillation of the bundled demo teacher

The pipeline: random-weight umT5 and CLIP in the official layout -> a tiny Wan VAE trained as an autoencoder
-> clips precomputed with data.precompute -> a tiny Wan I2V teacher trained with flow matching -> distill.py
(V-PAE and its ablations) -> generation on held-out conditions over several noise seeds, and four metrics.
Each stage writes into the output folder and is skipped when its output is already there.

The clips: data.synthetic_clip crosses its travel in m frames, m ~ U{17..50}, and the first 17 are kept. So a
first frame and its caption fix the shape, colour, place and direction but not the speed: the future is a
distribution, a one-step mean prediction smears it, and a good sampler draws one sharp speed.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

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
FULL = dict(vae_steps=(2000, 300), train_clips=1024, teacher_steps=3000, eval_clips=48, seeds=(0, 1, 2),
            phase1=200, phase2=300)
QUICK = dict(train_clips=64, eval_clips=16, seeds=(0, 1), phase1=40, phase2=80)
# the toy's recipe: the paper's losses and schedule shape, with lrs and head/LoRA sizes for a 1M-parameter model
RECIPE = ["--batch_size=8", "--lr_phase1=1e-5", "--lr_phase2=1e-5", "--lr_fake=1e-4", "--lr_disc=1e-3",
          "--lora_rank=16", "--disc_width=128", f"--shift={SHIFT}", f"--guide_scale={GUIDE}", "--grad_ckpt=false",
          "--export_dtype=fp32", "--log_every=20", "--ckpt_every=100000"]
ABLATIONS = {"no_phase1": ["--phase1_steps=0"], "teacher_backbone": ["--disc_backbone=teacher"],
             "no_semantic": ["--semantic=false"], "no_csds": ["--lambda_csds=0"]}
CONTROLS = {"no_adv": ["--lambda_adv=0"], "seed1": ["--seed=1"], "disc_shift1": ["--disc_shift=1"]}  # --controls:
# is the GAN term doing anything, how far apart are two training runs of one recipe (seed 1 runs its own Phase I),
# and does a discriminator that sees less noise (sigma_d shifted by 1, not 5) learn more?
ROWS = [  # (row, model, sampler, steps, NFE); "cfg" = Euler ODE with CFG, "x0" = the student sampler
    ("teacher, 50 steps + CFG", "teacher", "cfg", 50, 100), ("teacher, 4 steps + CFG", "teacher", "cfg", 4, 8),
    ("teacher, 1 step + CFG", "teacher", "cfg", 1, 2), ("teacher, 1 step, no CFG", "teacher", "x0", 1, 1),
    ("V-PAE student, 1 step", "full", "x0", 1, 1), ("V-PAE student, 4 steps", "full", "x0", 4, 4),
    ("ablation: no Phase I, 1 step", "no_phase1", "x0", 1, 1),
    ("ablation: D backbone = frozen teacher, 1 step", "teacher_backbone", "x0", 1, 1),
    ("ablation: no semantic head, 1 step", "no_semantic", "x0", 1, 1),
    ("ablation: lambda_csds = 0, 1 step", "no_csds", "x0", 1, 1),
    ("control: no adversarial term (lambda_adv = 0), 1 step", "no_adv", "x0", 1, 1),
    ("control: V-PAE with training seed 1, 1 step", "seed1", "x0", 1, 1),
    ("control: disc_shift = 1, 1 step", "disc_shift1", "x0", 1, 1)]

# -----------------------------------------------------------------------------
# metrics: pure functions of uint8 clips [F, H, W, 3]


def colour_mask(video, colour):
    """[F, H, W] bool: pixels whose nearest reference colour is `colour`. The references are the six palette
    colours of data.COLOURS and the clip's background, taken as the median pixel of its first frame."""
    v = video.astype(np.float32)
    refs = np.concatenate([np.array(list(data.COLOURS.values()), np.float32), np.median(v[0].reshape(-1, 3), 0)[None]])
    nearest = ((v[..., None, :] - refs) ** 2).sum(-1).argmin(-1)  # (F, H, W) index into refs
    return nearest == list(data.COLOURS).index(colour)


def motion_correct(video, colour, direction, min_px=3.0):
    """Whether the shape moves along the captioned direction. The centroid of colour_mask is taken in every frame
    where the mask has at least 4 pixels; there must be such frames for at least half the clip. The displacement
    from the first to the last of them must go at least min_px along `direction` and more along it than across."""
    mask = colour_mask(video, colour)
    seen = [f for f in range(len(mask)) if mask[f].sum() >= 4]
    if len(seen) < len(mask) / 2:
        return False
    centroid = lambda f: np.argwhere(mask[f]).mean(0)[::-1]  # noqa: E731  (x, y)
    dx, dy = centroid(seen[-1]) - centroid(seen[0])
    ux, uy = data.DIRECTIONS[direction]
    along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
    return bool(along >= min_px and along > across)


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


def make_clips(combos, seed, speeds=1):
    """uint8 [N, speeds, F, H, W, 3] and captions: clip i shows combos[i] from a random start and background; its
    `speeds` versions share both and differ only in speed (so they are draws of one condition's future)."""
    rng, clips = np.random.default_rng(seed), []
    for s, c, d in combos:
        ms = rng.integers(FRAMES, 3 * FRAMES, size=speeds)
        state = rng.bit_generator.state
        clips.append([])
        for m in ms:
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
    data.atomic(os.path.join(ckpt, "diffusion_pytorch_model.safetensors"),
                lambda f: save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, f))


def distill(ckpt, latents, out, args, log_file, stop_after=None):
    """distill.main in this process, on a free port, its output to log_file. With one process FSDP2 only adds
    overhead (about 1.5x on CPU), so its wrapping is skipped; the losses and updates are the same."""
    argv = [f"--teacher={ckpt}", f"--data={latents}", f"--out={out}", *RECIPE, *args]
    argv += [f"--stop_after={stop_after}"] if stop_after else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    shard, D.shard = D.shard, lambda model, device, cfg: model
    try:
        with open(log_file, "a") as f, contextlib.redirect_stdout(f):
            print("distill.py " + " ".join(argv), flush=True)
            D.main(argv)
    except SystemExit as e:  # distill.py exits 0 after --stop_after, with a checkpoint
        if e.code not in (0, None):
            raise
    finally:
        D.shard = shard


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


def score(videos, real, captions):
    """The four metrics of generated clips [N, F, H, W, 3] for the conditions of real [N, K, F, H, W, 3] (K real
    futures of each condition, all of which are the FD's reference set)."""
    words = [c.split() for c in captions]  # "a {colour} {shape} moving {direction}"
    ref = np.stack([clip_feature(v) for v in real.reshape(-1, *real.shape[2:])])
    areas = [colour_mask(r[0, :1], w[1]).sum() for r, w in zip(real, words)]
    return {"fd": frechet(np.stack([clip_feature(v) for v in videos]), ref),
            "psnr0": float(np.mean([psnr(v[0], r[0, 0]) for v, r in zip(videos, real)])),
            "motion": float(np.mean([motion_correct(v, w[1], w[4]) for v, w in zip(videos, words)])),
            "consistency": float(np.mean([consistency(v, w[1], a) for v, w, a in zip(videos, words, areas)]))}


def evaluate(ckpt, eval_latents, students, cfg, log):
    """Every row of ROWS whose model exists, over cfg["seeds"], plus the real clips through the VAE. Returns
    {row: {"nfe", metric: [value per seed]}} and, for the strip, seed 0's clips of two rows."""
    x, ds = load_all(eval_latents)
    real, captions = make_clips(eval_combos(cfg["eval_clips"]), EVAL_SEED, EVAL_SPEEDS)
    batch = D.prepare(x, ds.neg_context, DIT["text_len"], "cpu")  # contexts padded, the negative one per clip
    cond, neg = batch["cond"], batch["neg"]["context"]
    vae = WanVAE.from_pretrained(os.path.join(ckpt, sample.VAE_FILE))
    models = {"teacher": WanModel.from_pretrained(ckpt)}
    models |= {k: sample.load_dit(ckpt, torch.float32, "cpu", p) for k, p in students.items()}
    results = {"real clips through the VAE": {"nfe": "-", **{k: [v] for k, v in score(decode(vae, x["latent"]), real,
                                                                                        captions).items()}}}
    strip, names = {"real clip": real[:, 0]}, {"teacher, 50 steps + CFG": "teacher\n50 steps + CFG\n100 NFE",
                                                "V-PAE student, 1 step": "V-PAE student\n1 step\n1 NFE"}
    for row, key, sampler, steps, nfe in ROWS:
        if key not in models:
            continue
        t0, res = time.time(), {"nfe": nfe}
        for seed in cfg["seeds"]:
            videos = decode(vae, generate(models[key], sampler, steps, cond, neg, seed))
            for k, v in score(videos, real, captions).items():
                res.setdefault(k, []).append(v)
            if seed == cfg["seeds"][0] and row in names:
                strip[names[row]] = videos
        results[row] = res
        log(f"eval {row}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in res.items() if k != "nfe") +
            f" ({time.time() - t0:.0f}s)")
    return results, strip


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


def checks(results):
    """The expected orderings, each (statement, held). "Beats" and "worse" mean by more than the larger of the two
    rows' spreads over noise seeds, so a difference inside the noise does not count."""
    m = lambda row, k: float(np.mean(results[row][k])) if row in results else float("nan")  # noqa: E731
    sd = lambda row, k: float(np.std(results[row][k])) if row in results else 0.0  # noqa: E731

    def better(a, b, k):  # row a better than row b on metric k, beyond the noise
        d = (m(b, k) - m(a, k)) if k == "fd" else (m(a, k) - m(b, k))
        return d > max(sd(a, k), sd(b, k))

    s1, t50 = "V-PAE student, 1 step", "teacher, 50 steps + CFG"
    out = [(f"student 1 step beats {t} on FD ({m(s1, 'fd'):.2f} vs {m(t, 'fd'):.2f})", better(s1, t, "fd"))
           for t in ("teacher, 1 step + CFG", "teacher, 1 step, no CFG") if t in results]
    if t50 in results:
        out.append((f"student 1 step FD within 2x of the 100-NFE teacher ({m(s1, 'fd'):.2f} vs {m(t50, 'fd'):.2f})",
                    m(s1, "fd") < 2 * m(t50, "fd")))
    for row in (r for r in results if r.startswith("ablation")):
        worse = [k for k in ("fd", "psnr0", "motion", "consistency") if better(s1, row, k)]
        out.append((f"{row} worse than V-PAE beyond the noise on at least one metric ({', '.join(worse) or 'none'})",
                    bool(worse)))
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


def phase2_stats(distill_dir):
    """{run: means over the logged Phase II steps of its log.jsonl}: the discriminator's hinge loss (2 = chance),
    D(real) - D(fake), the generator's adversarial term and the (unweighted) C-SDS loss."""
    stats = {}
    for run in sorted(os.listdir(distill_dir)) if os.path.isdir(distill_dir) else []:
        path = os.path.join(distill_dir, run, "log.jsonl")
        steps = [e for e in map(json.loads, open(path)) if e["phase"] == 2] if os.path.isfile(path) else []
        if steps:
            mean = lambda k: float(np.mean([e[k] for e in steps]))  # noqa: E731
            stats[run] = {"steps": len(steps), "loss_d": mean("loss_d"), "margin": mean("d_real") - mean("d_fake"),
                          "loss_g_adv": mean("loss_g_adv"), "loss_csds": mean("loss_csds")}
    return stats


def report(results, times, argv, out):
    fmt = lambda v, d: f"{np.mean(v):.{d}f}" + (f" ± {np.std(v):.{d}f}" if len(v) > 1 else "")  # noqa: E731
    info = machine()
    lines = [f"command: `python toy.py {' '.join(argv)}`  ",
             f"machine: {info['cpus']} CPU cores ({info['cpu']}), torch {info['torch']}, {info['threads']} threads; "
             f"commit {info['commit']}  ",
             "wall clock: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()), "",
             "| model | NFE | FD ↓ | first-frame PSNR (dB) ↑ | motion accuracy ↑ | consistency ↑ |", "|---|---|---|---|---|---|"]
    for row, r in results.items():
        lines.append(f"| {row} | {r['nfe']} | {fmt(r['fd'], 3)} | {fmt(r['psnr0'], 1)} | {fmt(r['motion'], 2)} | "
                     f"{fmt(r['consistency'], 2)} |")
    lines += ["", "mean ± std over noise seeds; " + ("the checks:" if results else "")]
    held = checks(results)
    lines += [f"- {'held' if ok else 'DID NOT HOLD'}: {s}" for s, ok in held]
    stats = phase2_stats(os.path.join(out, "distill"))
    lines += ["", "Phase II of each distillation run, means over its logged steps (log.jsonl):", "",
              "| run | logged steps | D hinge loss (2 = chance) | D(real) - D(fake) | G adversarial term | C-SDS |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {run} | {v['steps']} | {v['loss_d']:.3f} | {v['margin']:.3f} | {v['loss_g_adv']:.3f} | "
              f"{v['loss_csds']:.3f} |" for run, v in stats.items()]
    text = "\n".join(lines) + "\n"
    data.write_text(text, os.path.join(out, "results.md"))
    data.write_json({"argv": argv, "machine": info, "times_s": times, "results": results, "checks": held,
                     "phase2": stats},
                    os.path.join(out, "results.json"))
    print(text)


def export_assets(out):
    """The demo in the official layout under assets/demo, plus assets/example.png and assets/strip.png."""
    demo = os.path.join(ROOT, "assets", "demo")
    shutil.rmtree(demo, ignore_errors=True)
    shutil.copytree(os.path.join(out, "ckpt"), demo)
    shutil.copy(os.path.join(out, "distill", "full", "student.safetensors"), os.path.join(demo, "student.safetensors"))
    cfg = json.load(open(os.path.join(demo, "config.json")))
    cfg["vpae_demo"] = {"student": "student.safetensors", "frames": FRAMES, "size": f"{SIZE}*{SIZE}", "shift": SHIFT,
                        "guide_scale": GUIDE, "prompt": "a red circle moving right"}  # sample.py's defaults
    data.write_json(cfg, os.path.join(demo, "config.json"))
    imageio.imwrite(os.path.join(ROOT, "assets", "example.png"), make_clips([("circle", "red", "right")], 7)[0][0, 0, 0])
    shutil.copy(os.path.join(out, "strip.png"), os.path.join(ROOT, "assets", "strip.png"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ROOT, "assets")) for f in fs)
    print(f"wrote assets/ ({size / 2**20:.1f} MiB)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI: distil the bundled demo teacher briefly, check the ordering")
    p.add_argument("--export-assets", action="store_true", help="after the pipeline, copy its models into assets/")
    p.add_argument("--controls", action="store_true", help="three more runs: no adversarial term; training seed 1; disc_shift 1")
    p.add_argument("--out", help="output folder (default run/toy, or run/toy-quick)")
    args = p.parse_args(argv)
    cfg, out = (QUICK if args.quick else FULL), os.path.abspath(args.out or os.path.join(ROOT, "run", "toy-quick" if args.quick else "toy"))
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
        data.write_json({"_class_name": "WanModel", "_diffusers_version": "0.30.0", **DIT},
                        os.path.join(ckpt, "config.json"))
        stage("encoders", os.path.join(ckpt, sample.T5_FILE), lambda: write_encoders(ckpt))
        stage("vae", os.path.join(ckpt, sample.VAE_FILE),
              lambda: train_vae(os.path.join(ckpt, sample.VAE_FILE), cfg["vae_steps"], lambda m: print(m, flush=True)))
    seen = [k for k in COMBOS if k not in HELD_OUT]
    sets = {"train": ([seen[i] for i in np.random.default_rng(0).integers(len(seen), size=cfg["train_clips"])], 0, 1),
            "eval": (eval_combos(cfg["eval_clips"]), EVAL_SEED, EVAL_SPEEDS)}
    for name, (combos, seed, speeds) in sets.items():
        videos, latents = os.path.join(out, f"{name}_videos"), os.path.join(out, f"{name}_latents")
        stage(f"{name} clips", os.path.join(videos, "captions.jsonl"),
              lambda: write_videos(videos, *make_clips(combos, seed, speeds)))
        stage(f"{name} precompute", os.path.join(latents, "neg_context.safetensors"),
              lambda: data.precompute(ckpt, videos, latents, FRAMES, f"{SIZE}*{SIZE}", "cpu"))
    train_lat, eval_lat = os.path.join(out, "train_latents"), os.path.join(out, "eval_latents")
    if not args.quick:
        stage("teacher", os.path.join(ckpt, "diffusion_pytorch_model.safetensors"),
              lambda: train_teacher(ckpt, train_lat, cfg["teacher_steps"], lambda m: print(m, flush=True)))

    steps = [f"--phase1_steps={cfg['phase1']}", f"--phase2_steps={cfg['phase2']}"]
    runs = {"full": []} if args.quick else {"full": [], **ABLATIONS, **(CONTROLS if args.controls else {})}
    d = os.path.join(out, "distill")
    shared = os.path.join(d, "phase1", f"ckpt_{cfg['phase1']:08d}")  # Phase I is run once and shared
    if len(runs) > 1:
        stage("distill phase1", shared, lambda: distill(ckpt, train_lat, os.path.dirname(shared), steps,
                                                          os.path.join(out, "logs", "distill_phase1.log"), cfg["phase1"]))
    for name, extra in runs.items():
        def run(name=name, extra=extra):
            if len(runs) > 1 and name not in ("no_phase1", "seed1") and not os.path.isdir(os.path.join(d, name, os.path.basename(shared))):
                shutil.copytree(shared, os.path.join(d, name, os.path.basename(shared)))  # resume after Phase I
            distill(ckpt, train_lat, os.path.join(d, name), steps + extra, os.path.join(out, "logs", f"distill_{name}.log"))
        stage(f"distill {name}", os.path.join(d, name, "student.safetensors"), run)

    t0 = time.time()
    students = {k: os.path.join(d, k, "student.safetensors") for k in runs}
    results, strip = evaluate(ckpt, eval_lat, students, cfg, log)
    frame_strip(strip, os.path.join(out, "strip.png"))
    times["eval"] = time.time() - t0
    times["total"] = time.time() - t_all
    report(results, times, argv, out)
    if args.export_assets:
        export_assets(out)
    if args.quick:  # loose, but it can fail: a short distillation must beat the teacher at the same NFE (1)
        failed = [s for s, ok in checks(results) if "beats teacher, 1 step, no CFG" in s and not ok]
        if failed:
            sys.exit("toy.py --quick: ordering check failed: " + "; ".join(failed))
        print("toy.py --quick: ordering check passed")
    return results


if __name__ == "__main__":
    main()
