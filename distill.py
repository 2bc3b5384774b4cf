"""V-PAE distillation of a Wan2.1 DiT into a one-step generator (README: "How V-PAE works").

  torchrun --nproc_per_node=8 distill.py --teacher=Wan2.1-I2V-14B-480P --data=latents/ --out=run/ --sp=8
  python distill.py --teacher=... --data=... --out=...            # one process works too
  python distill.py --export_lora=64 --teacher=... --out=run/     # run/student.safetensors as a rank-64 LoRA
  python distill.py --export_from=run/ckpt_00000500                # that checkpoint's EMA as run/student_00000500.safetensors

Phase I (stability priming): a DMD gradient pulls the one-step output towards the CFG teacher, against a LoRA
"fake" score that tracks the generator. Phase II (unified adversarial equilibrium): a hinge GAN whose discriminator
is a few heads reading the hidden states of a frozen backbone, the generator's own EMA, plus a conditional
score-distillation term (C-SDS) towards the CFG teacher. The same loops run the peers users would pick instead
(toy.py PEERS): DMD and DMD2 are Phase I alone, from pure noise; adversarial-only is Phase II without C-SDS.

FSDP2 shards every model over all ranks (or HSDP within groups of them), Ulysses sequence parallelism splits one
clip's tokens over `sp` ranks, and torch.distributed.checkpoint writes checkpoints that resume on any number of
ranks. Config lists the paper's fields first, each marked [paper] or [choice] (the paper is silent: the closest
prior work's), then this project's additions, then the infrastructure.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import data as D
from model import Discriminator, WanModel
from sample import VAE_FILE, lora_state, write_video
from sample import shift_sigma as shift
from vae import WanVAE


@dataclass
class Config:
    # ---- what to distil, and where -------------------------------------------------------------------------------
    teacher: str = ""  # official Wan2.1 checkpoint directory: the teacher, and the generator's initialisation
    data: str = ""  # a precomputed folder (data.py --out) or a video folder (precomputed into OUT/latents first)
    out: str = "out"  # checkpoints, logs and the exported student.safetensors
    # ---- the method: [paper] = the paper's value; [choice] = the paper is silent, the closest prior work's --------
    phase1_steps: int = 500  # Phase I, stability priming (DMD) [paper]
    phase2_steps: int = 1000  # Phase II, adversarial equilibrium (GAN + C-SDS) [paper]
    batch_size: int = 32  # global batch per optimizer step [paper]
    lr_phase1: float = 1e-6  # generator lr in Phase I [paper]
    lr_phase2: float = 2e-6  # generator lr in Phase II [paper]
    ema: float = 0.995  # EMA decay; the EMA is the exported student and D's backbone [paper]
    sigma_g_min: float = 0.9  # Phase I generator input sigma ~ U[sigma_g_min, 1] [paper: t in [0.9T, T]]
    guide_scale: float = 5.0  # teacher CFG w in DMD's and C-SDS's targets [choice: Wan's default]
    shift: float = 3.0  # re-noising shift of DMD and C-SDS [choice: the task's Wan sample shift; 5 at 720p]
    k_fake: int = 1  # fake-score updates per generator step in Phase I [choice: APT-like 1; DMD2 uses 5]
    lr_fake: float = 1e-5  # fake-score LoRA lr [choice]
    lora_rank: int = 64  # fake-score LoRA rank, on the blocks' attention and FFN linears [choice]
    lambda_csds: float = 10.0  # weight of C-SDS in the generator loss [paper]
    lambda_r1: float = 1.0  # weight of STR1 in D's loss [choice]
    r1_sigma_s: float = 0.01  # STR1 spatial perturbation [paper]
    r1_sigma_t: float = 0.1  # STR1 temporal perturbation [paper]
    disc_backbone: str = "ema"  # whose hidden states D's heads read: ema | live (G) | teacher (frozen) [paper: ema]
    semantic: bool = True  # the heads' self-attention over the image and text tokens [paper]
    disc_taps: int = 4  # tapped blocks, evenly spaced, ending at the last [choice]
    disc_queries: int = 4  # learnable query tokens per head [choice]
    disc_steps: int = 1  # D steps per generator step, each on fresh clips [choice: APT]
    lr_disc: float = 1e-5  # D's heads' lr [choice]
    beta1: float = 0.0  # Adam beta1 of the generator and heads in Phase II [choice: APT-like]
    beta2: float = 0.99  # Adam beta2, likewise [choice]
    # ---- this project's additions (EXPERIMENTS.md says how each was chosen) ------------------------------------
    disc_shift: float = 5.0  # D's noising shift at disc_shift_ref tokens per clip
    disc_shift_ref: int = 32760  # scale disc_shift by sqrt(tokens / this), as Wan's shifts follow resolution; 0 = fixed
    disc_width: int = 0  # head width; 0 = the DiT's width, at most 1024
    csds_guide_scale: float = 0.0  # C-SDS's w where the re-noising sigma' < csds_guide_until (a guidance interval); 0 = off
    csds_guide_until: float = 0.75  # see csds_guide_scale; 0.75 is the median sigma' at shift 3
    student_steps: int = 1  # Phase II trains G also at the inputs of an N-step sampler (student_sigma); 1 = one step
    backward_sim: bool = False  # with student_steps N > 1: those inputs re-noise G's own earlier guesses (DMD2), not clips
    lambda_adv: float = 1.0  # weight of the adversarial term in the generator loss; 0 = C-SDS alone (a control)
    gan_weight: float = 0.0  # DMD2's GAN in Phase I: its generator weight (FastGen: 0.03), heads on the fake score; 0 = off
    grad_clip: float = 10.0  # clip the global gradient norm of each trained model to this (FastGen, LADD); 0 = off
    val_data: str = ""  # a precomputed folder of held-out clips: D's real-vs-fake accuracy is logged on them
    val_every: int = 50  # Phase II steps between those evaluations (and at the end of Phase II)
    val_sigmas: str = "0.25,0.5,0.75"  # the fixed sigma_d of the accuracy
    val_clips: int = 32  # at most this many clips of val_data
    # ---- infrastructure -----------------------------------------------------------------------------------------
    seed: int = 0  # seeds the data order, the noise and the initial heads and LoRA
    micro_batch: int = 1  # clips per rank per forward; batch_size is accumulated from these
    sp: int = 1  # Ulysses sequence-parallel degree (divides the world size and num_heads)
    shard_ranks: int = 0  # HSDP: shard within groups of this many ranks (a node), replicate across them; 0 = all ranks
    param_dtype: str = ""  # compute dtype, bf16 | fp32 ("": bf16 on GPU, fp32 on CPU); weights, grads, Adam, EMA fp32
    grad_ckpt: bool = True  # per-block activation checkpointing
    timeout_min: float = 30.0  # a training collective that waits this long stops the run (a rank is stuck)
    wait_hours: float = 24.0  # how long ranks wait for one rank's long work (precompute, checkpoint, export)
    log_every: int = 10  # steps between lines of OUT/log.jsonl
    tensorboard: bool = False  # also log to OUT/tb (needs the tensorboard package)
    preview_every: int = 0  # steps between one-step previews of the EMA in OUT/previews/ (rank 0 decodes); 0 = none
    preview_clips: int = 2  # previews per time: the first clips of val_data, else of data
    ckpt_every: int = 100  # steps between checkpoints (one is also taken at the end and on SIGTERM or Ctrl-C)
    async_ckpt: bool = True  # write checkpoints while training goes on (a CPU copy of each rank's shards first)
    keep_ckpts: int = 3  # the newest complete checkpoints kept, also at the end
    max_bad_steps: int = 20  # stop after this many non-finite losses (each skips its step)
    stop_after: int = 0  # end this invocation after this many steps, with a checkpoint; 0 = run to the end
    export_dtype: str = "bf16"  # dtype of student.safetensors and of LoRA exports (official files are fp32)
    export_lora: int = 0  # RANK > 0: no training; OUT/student.safetensors (kept) as a LoRA, OUT/student_lora_rank<RANK>.safetensors
    export_from: str = ""  # OUT/ckpt_N: no training; write that checkpoint's EMA as OUT/student_N.safetensors


def fail(msg):
    """A user error: one line from rank 0 (every rank finds the same error), then exit 1 on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(f"distill.py: error: {msg}" if rank == 0 else 1)


def usage():
    """The usage lines at the top of this file, then each Config field with its type, default and the comment beside
    it, under the headings of its group. Read from this file's source: one line per field is its documentation."""
    import inspect
    out = [__doc__.split("\n\n")[1], "", "distill.py --field=value ...  (or --field value)"]
    for line in inspect.getsource(Config).splitlines()[2:]:
        if m := re.fullmatch(r"    (\w+): (\w+) = (.*?)  # (.*)", line):
            out.append(f"  --{m[1]}={m[3].strip(chr(34))}  ({m[2]})  {m[4]}")
        else:  # a group's heading
            out.append("\n" + line.strip(" #-"))
    return "\n".join(out)


def parse_args(argv):
    """--field=value (or --field value) overrides of Config, type-checked; --help lists the fields."""
    cfg, types = Config(), {f.name: f.type.__name__ for f in dataclasses.fields(Config)}
    if {"-h", "--help"} & set(argv):
        print(usage()) if int(os.environ.get("RANK", 0)) == 0 else None
        sys.exit(0)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if re.fullmatch(r"--\w+", arg) and argv and not argv[0].startswith("--"):
            arg += "=" + argv.pop(0)  # --field value
        m = re.fullmatch(r"--(\w+)=(.*)", arg)
        if not m or m[1] not in types:
            fail(f"unknown argument {arg!r}: use --field=value with a field of Config (distill.py --help lists them)")
        name, val, typ = m[1], m[2], types[m[1]]
        try:
            v = {"bool": lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()],
                 "int": int, "float": float, "str": str}[typ](val)
        except (KeyError, ValueError):
            fail(f"--{name}={val!r}: expected a {typ}")
        setattr(cfg, name, v)
    if cfg.param_dtype not in ("", "bf16", "fp32"):
        fail(f"--param_dtype={cfg.param_dtype!r}: use bf16 or fp32 (or leave it out: bf16 on GPU, fp32 on CPU)")
    if cfg.disc_backbone not in ("ema", "live", "teacher"):
        fail(f"--disc_backbone={cfg.disc_backbone!r}: use ema, live or teacher")
    for name in ("grad_clip", "shard_ranks", "preview_every"):
        if getattr(cfg, name) < 0:
            fail(f"--{name}={getattr(cfg, name)}: use a value >= 0 (0 = off)")
    if cfg.student_steps < 1:
        fail(f"--student_steps={cfg.student_steps}: use 1 (the one-step student) or the steps you will sample with")
    if cfg.backward_sim and cfg.student_steps == 1:
        fail("--backward_sim simulates the steps of a few-step sampler: give --student_steps=N (N > 1) with it")
    if cfg.timeout_min <= 0 or cfg.wait_hours <= 0 or cfg.preview_clips < 1:
        fail(f"--timeout_min={cfg.timeout_min} --wait_hours={cfg.wait_hours} --preview_clips={cfg.preview_clips}: "
             "use positive values")
    if not 0 <= cfg.csds_guide_until <= 1 or cfg.csds_guide_scale < 0:
        fail(f"--csds_guide_until={cfg.csds_guide_until} --csds_guide_scale={cfg.csds_guide_scale}: use a sigma in "
             "[0, 1] and a w >= 0 (0 = off)")
    return cfg


# -----------------------------------------------------------------------------
# flow-matching helpers (x_s = (1 - s) x0 + s eps, v = eps - x0, t = 1000 s)


def bcast(s):
    return s.view(-1, 1, 1, 1, 1)


# Every random draw of a step comes from its clip's own generator (rng: one per clip of the micro-batch, see
# clip_rngs), so a clip's noise does not depend on how ranks, sp groups and micro-batches split the batch.


def noise_like(x, rng):
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in rng])


def uniform(lo, hi, rng, device):
    return lo + (hi - lo) * torch.cat([torch.rand(1, generator=g, device=device) for g in rng])


def renoise_sigma(k, rng, device):
    """sigma = shift(u, k), u ~ U[0.02, 0.98]: the re-noising level of DMD, C-SDS and the discriminator."""
    return shift(uniform(0.02, 0.98, rng, device), k)


class LoRALinear(nn.Linear):
    """A Linear of the teacher with the fake score's low-rank update: out + lora_B(lora_A(x)) while `fake` is set
    (see fake_score), the plain Linear otherwise. lora_B starts at zero, so F = T at first. Its weight and bias keep
    their names, so the official file fills it."""

    def __init__(self, lin, rank):
        super().__init__(lin.in_features, lin.out_features, lin.bias is not None, device="meta")  # nothing drawn
        self.weight, self.bias, dev = lin.weight, lin.bias, lin.weight.device
        self.lora_A = nn.Linear(lin.in_features, rank, bias=False, device=dev, dtype=torch.float32)  # fp32 in any model
        self.lora_B = nn.Linear(rank, lin.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)
        self.fake = False

    def forward(self, x):
        out = super().forward(x)
        return out + self.lora_B(self.lora_A(x)) if self.fake else out


def add_lora(model, rank):
    """Make the attention and FFN linears of every block LoRALinears of the given rank (their LoRAs trainable)."""
    for block in model.blocks:
        for name, lin in list(block.named_modules()):
            if isinstance(lin, nn.Linear) and name.startswith(("self_attn", "cross_attn", "ffn")):
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, LoRALinear(lin, rank))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    first = next(m for m in model.modules() if isinstance(m, LoRALinear))
    # with grad_ckpt, a block recomputes its forward during the backward: as F if the forward ran as F, wherever the
    # backward runs
    model.ckpt_context = lambda: (contextlib.nullcontext(), fake_score(model, first.fake))


@contextlib.contextmanager
def fake_score(model, on=True):
    """Within this block, the teacher with add_lora's LoRAs is the fake score F (on=False: the teacher T); after it,
    as it was before."""
    lins = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.fake for m in lins]
    for m in lins:
        m.fake = on
    try:
        yield
    finally:
        for m, b in zip(lins, before):
            m.fake = b


def lora_init(model):
    """The LoRAs' first weights, drawn on the CPU from the global RNG (alike on every rank) as nn.Linear draws them,
    in the order add_lora builds them; B is then zeroed. For a model built on the meta device."""
    init = {}
    for n, p in model.named_parameters():
        if ".lora_" in n:
            w = nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5))
            init[n] = w.zero_() if n.endswith(".lora_B.weight") else w
    return init


def run(model, x, s, cond, **kw):
    """The DiT on latents x at noise level s [B] with condition dict cond (context, and clip_fea/y for i2v)."""
    return model(x, 1000 * s, cond["context"], cond.get("clip_fea"), cond.get("y"), **kw)


def cfg_velocity(teacher, x, s, cond, neg, w):
    """v_T^w = v(c_neg) + w (v(c) - v(c_neg)), both halves in one batch."""
    both = {k: torch.cat([v, neg[k] if k == "context" else v]) for k, v in cond.items()}
    v_c, v_n = run(teacher, torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)
    return v_n + w * (v_c - v_n)


def cfg_x0(teacher, x_s, s, cond, neg, w):
    """The CFG teacher's guess of x0 from x_s, x_s - s v_T^w: DMD's real score and C-SDS's target."""
    return x_s - bcast(s) * cfg_velocity(teacher, x_s, s, cond, neg, w)


# -----------------------------------------------------------------------------
# the losses, each a plain function of tensors so the tests can check it directly


def dmd_loss(x0_hat, x0_real, x0_fake):
    """DMD in x0 form: g = (x0_fake - x0_real) / mean|x0_hat - x0_real| per sample; L = 1/2 mean((x0_hat - sg(x0_hat - g))^2)."""
    with torch.no_grad():
        norm = (x0_hat - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        target = x0_hat - (x0_fake - x0_real) / norm.clamp_min(1e-8)
    return 0.5 * F.mse_loss(x0_hat, target)


def hinge_d(d_real, d_fake):
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def str1_delta(x, sigma_s, sigma_t, rng):
    """Spatio-temporal perturbation: i.i.d. per element, plus one draw per (sample, channel, frame) over H and W."""
    eps_t = noise_like(x[:, :, :, :1, :1], rng)
    return sigma_s * noise_like(x, rng) + sigma_t * eps_t


def str1_loss(d_pert, d_clean, delta):
    """Finite-difference R1: mean((D(x + delta) - D(x))^2) / mean(delta^2)."""
    return (d_pert - d_clean).pow(2).mean() / delta.pow(2).mean()


def csds_loss(x0_hat, target):
    return F.mse_loss(x0_hat, target.detach())


def csds_guidance(cfg, s):
    """C-SDS's CFG w: guide_scale, or per sample csds_guide_scale where the re-noising sigma' s < csds_guide_until."""
    if not cfg.csds_guide_scale:
        return cfg.guide_scale
    return bcast(torch.where(s < cfg.csds_guide_until, cfg.csds_guide_scale, cfg.guide_scale).to(s.dtype))


def clip_grads(params, max_norm):
    """Scale the gradients of params to a global norm (over every rank's shards) of at most max_norm (0: no limit);
    returns their norm before."""
    norm = nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


# -----------------------------------------------------------------------------
# one optimizer step of each kind; each returns a dict of logged scalars


def one_step(m, x0, cond, s_g, rng):
    """G's guess of x0 from x0 noised at s_g (pure noise at s_g = 1, the inference path)."""
    x_in = (1 - bcast(s_g)) * x0 + bcast(s_g) * noise_like(x0, rng)
    return x_in - bcast(s_g) * run(m.gen, x_in, s_g, cond)


def phase1_step(cfg, m, batch, rng):
    """Stability priming, and the DMD and DMD2 peers: a DMD generator step (plus DMD2's GAN term when gan_weight > 0),
    then k_fake fake-score steps: the first on this step's sample, each other on a fresh sample of G (DMD2's two
    time-scale rule). With the GAN, each also trains D's heads on the fake score's features (non-saturating loss)."""
    x0, cond = batch["latent"], batch["cond"]
    dev = x0.device
    s_g = uniform(cfg.sigma_g_min, 1.0, rng, dev)
    x0_hat = one_step(m, x0, cond, s_g, rng)
    s = renoise_sigma(cfg.shift, rng, dev)
    x_s = (1 - bcast(s)) * x0_hat.detach() + bcast(s) * noise_like(x0, rng)
    with torch.no_grad():
        x0_real = cfg_x0(m.teacher, x_s, s, cond, batch["neg"], cfg.guide_scale)
        with fake_score(m.teacher):
            x0_fake = x_s - bcast(s) * run(m.teacher, x_s, s, cond)
    loss_g, stats = dmd_loss(x0_hat, x0_real, x0_fake), {}
    if cfg.gan_weight:  # the generator's GAN term, through the fake score's features: its gradient at x0_hat only
        (fake_d,), s_d = noisy_d(cfg, [x0_hat], rng)
        with fake_score(m.teacher):
            loss_gan = F.softplus(-m.disc(*run(m.teacher, fake_d, s_d, cond, taps=m.disc.taps)[1:])).mean()
            gx = torch.autograd.grad(loss_g + cfg.gan_weight * loss_gan, x0_hat)[0]
        x0_hat.backward(gx)
        stats["loss_gan_g"] = loss_gan.detach()
    else:
        loss_g.backward()
    loss_f = loss_cls = 0.0
    sample = x0_hat.detach()
    with fake_score(m.teacher):
        for i in range(cfg.k_fake):
            if i:
                with torch.no_grad():
                    sample = one_step(m, x0, cond, uniform(cfg.sigma_g_min, 1.0, rng, dev), rng)
            s2 = renoise_sigma(cfg.shift, rng, dev)
            eps = noise_like(x0, rng)
            x_s2 = (1 - bcast(s2)) * sample + bcast(s2) * eps
            lf = F.mse_loss(run(m.teacher, x_s2, s2, cond), eps - sample) / cfg.k_fake
            lf.backward()
            loss_f += lf.detach()
            if cfg.gan_weight:  # the heads on the fake score's features (no gradient into the LoRA), real vs G's sample
                (real_d, fake_d), s_d = noisy_d(cfg, [x0, sample], rng)
                with torch.no_grad():
                    _, hidden, ctx = run(m.teacher, torch.cat([real_d, fake_d]), s_d.repeat(2),
                                         {k: torch.cat([v, v]) for k, v in cond.items()}, taps=m.disc.taps)
                d_real, d_fake = m.disc(hidden, ctx).chunk(2)
                lc = (F.softplus(-d_real).mean() + F.softplus(d_fake).mean()) / cfg.k_fake
                lc.backward()
                loss_cls += lc.detach()
    stats |= {"loss_dmd": loss_g.detach(), "loss_fake": loss_f}
    return stats | ({"loss_cls": loss_cls} if cfg.gan_weight else {})


def sampler_sigmas(cfg, dev):
    """The N-step sampler's input sigmas shift(1 - k/N, shift), k = 0..N-1 (sample.py's sample_student)."""
    return shift(1 - torch.arange(cfg.student_steps, device=dev) / cfg.student_steps, cfg.shift)


def student_sigma(cfg, B, rng, dev):
    """Phase II's generator input sigma per clip: 1 (pure noise, the one-step path), or, with student_steps N > 1, one
    of the N-step sampler's sigmas, each equally likely."""
    if cfg.student_steps == 1:
        return torch.ones(B, device=dev)
    k = (uniform(0, 1, rng, dev) * cfg.student_steps).floor().clamp(max=cfg.student_steps - 1)
    return sampler_sigmas(cfg, dev)[k.long()]


def student_generate(cfg, model, x, cond, rng):
    """The N-step sampler (sample.py's sample_student, N = student_steps) from noise x: G's guess at each of
    sampler_sigmas, re-noised to the next with fresh noise from the clips' generators; one step is x - v(x, 1)."""
    sigmas = sampler_sigmas(cfg, x.device).tolist() + [0.0]
    for k in range(cfg.student_steps):
        x = x - sigmas[k] * run(model, x, torch.full((x.shape[0],), sigmas[k], device=x.device), cond)
        if sigmas[k + 1] > 0:
            x = (1 - sigmas[k + 1]) * x + sigmas[k + 1] * noise_like(x, rng)
    return x


def student_sample(cfg, m, x0, cond, rng):
    """Phase II's generator sample: G's guess from its input at student_sigma. Below sigma 1 that input is the real
    clip noised, or, with backward_sim, G's own guess after the sampler's first k steps noised, as sampling gives
    (DMD2's backward simulation; no gradient through those steps). All N - 1 steps run for every clip, so that every
    rank runs as many forwards (FSDP's collectives need it)."""
    s_g = student_sigma(cfg, x0.shape[0], rng, x0.device)
    if cfg.backward_sim:  # parse_args refuses it at N = 1, where the loop would run no step
        sigmas = sampler_sigmas(cfg, x0.device)
        with torch.no_grad():
            guess, start = x0, x0  # at sigma 1 (k = 0) the clip is not seen: its weight in the input is 0
            for k in range(cfg.student_steps - 1):
                guess = one_step(m, guess, cond, sigmas[k].expand(len(s_g)), rng)
                start = torch.where(bcast(s_g == sigmas[k + 1]), guess, start)
        x0 = start
    return one_step(m, x0, cond, s_g, rng)


def disc_shift(cfg, x):
    """D's noising shift for latents x: disc_shift, times sqrt(tokens / disc_shift_ref) when disc_shift_ref is set.
    Noise hides a clip's content in proportion to the clip's size: the same sigma leaves more signal in more tokens,
    which is why Wan samples 720p at shift 5 and 480p at 3 (sqrt(75600 / 32760) x 3 = 4.6)."""
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4  # Wan's patch is (1, 2, 2)
    return cfg.disc_shift * math.sqrt(tokens / cfg.disc_shift_ref) if cfg.disc_shift_ref else cfg.disc_shift


def noisy_d(cfg, xs, rng):
    """Noise each of the tensors xs at one shared sigma_d = shift(u, disc_shift) per sample."""
    s = renoise_sigma(disc_shift(cfg, xs[0]), rng, xs[0].device)
    return [(1 - bcast(s)) * x + bcast(s) * noise_like(x, rng) for x in xs], s


def disc(m, x_d, s, cond):
    """D = the heads on the hidden states of the frozen backbone (no parameter of it gets a gradient)."""
    _, hidden, ctx = run(m.backbone, x_d, s, cond, taps=m.disc.taps)
    return m.disc(hidden, ctx)


def phase2_d_step(cfg, m, batch, rng):
    """Hinge loss + STR1 on the heads only. Real, perturbed real and fake go through one backbone pass."""
    x0, cond = batch["latent"], batch["cond"]
    with torch.no_grad():
        fake = student_sample(cfg, m, x0, cond, rng)
        (real_d, fake_d), s = noisy_d(cfg, [x0, fake], rng)
        delta = str1_delta(x0, cfg.r1_sigma_s, cfg.r1_sigma_t, rng)
        cond3 = {k: torch.cat([v, v, v]) for k, v in cond.items()}
        _, hidden, ctx = run(m.backbone, torch.cat([real_d, real_d + delta, fake_d]), s.repeat(3), cond3, taps=m.disc.taps)
    d_real, d_pert, d_fake = m.disc(hidden, ctx).chunk(3)
    loss_adv = hinge_d(d_real, d_fake)
    loss_r1 = str1_loss(d_pert, d_real, delta)
    (loss_adv + cfg.lambda_r1 * loss_r1).backward()
    return {"loss_d": loss_adv.detach(), "loss_r1": loss_r1.detach(), "d_real": d_real.mean().detach(),
            "d_fake": d_fake.mean().detach()}


def phase2_g_step(cfg, m, batch, rng):
    """L_G = -lambda_adv * mean D(x0_hat) + lambda_csds * C-SDS; the gradient reaches the generator only through x0_hat."""
    x0, cond = batch["latent"], batch["cond"]
    dev = x0.device
    x0_hat = student_sample(cfg, m, x0, cond, rng)
    # a term weighted 0 (an ablation) is not computed, its gradient is 0: the same update at less cost. Its noise is
    # still drawn, so the random streams stay those of the full method.
    (fake_d,), s_d = noisy_d(cfg, [x0_hat], rng)
    loss_adv = -disc(m, fake_d, s_d, cond).mean() if cfg.lambda_adv else torch.zeros((), device=dev)
    s = renoise_sigma(cfg.shift, rng, dev)
    with torch.no_grad():
        x_s = (1 - bcast(s)) * x0_hat + bcast(s) * noise_like(x0, rng)
        target = cfg_x0(m.teacher, x_s, s, cond, batch["neg"], csds_guidance(cfg, s)) if cfg.lambda_csds else None
    loss_csds = csds_loss(x0_hat, target) if cfg.lambda_csds else torch.zeros((), device=dev)
    # each term's gradient at x0_hat, kept apart to log how hard each pushes G, then one backward through G. Each grad
    # stops at x0_hat, so G's graph survives it while the backbone's is freed before G's backward.
    g_adv, g_csds = (torch.autograd.grad(lam * loss, x0_hat)[0] if lam else torch.zeros_like(x0_hat)
                     for lam, loss in ((cfg.lambda_adv, loss_adv), (cfg.lambda_csds, loss_csds)))
    x0_hat.backward(g_adv + g_csds)
    gx_adv = g_adv.norm().detach()
    if m.gen.sp_group is not None:  # under sp, each rank holds sp x the adversarial gradient of its own tokens alone
        gx_adv = gx_adv.square()
        dist.all_reduce(gx_adv, group=m.gen.sp_group)
        gx_adv = gx_adv.sqrt() / dist.get_world_size(m.gen.sp_group)
    return {"loss_g_adv": loss_adv.detach(), "loss_csds": loss_csds.detach(), "gx_adv": gx_adv,
            "gx_csds": g_csds.norm().detach()}


@torch.no_grad()
def disc_accuracy(cfg, m, val, neg, device, dp_rank, dp):
    """D's accuracy on held-out clips, real against the generator's one-step sample of the same condition, at each
    fixed sigma_d of val_sigmas: the fraction of clips where D(real) > D(fake), both noised alike (0.5 = chance).
    A paired test does not depend on D's offset, which the hinge loss leaves free. Each clip's noise comes from a
    fixed seed, so successive evaluations differ only by D and G. The micro-batches are split over the data-parallel
    groups; every rank runs as many forwards (FSDP's collectives need it), a spare one repeating the last, uncounted."""
    sigmas, mb = [float(v) for v in cfg.val_sigmas.split(",")], cfg.micro_batch
    hits, n_mb = torch.zeros(len(sigmas), device=device), -(-len(val) // mb)
    for r in range(0, n_mb, dp):
        i = min(r + dp_rank, n_mb - 1) * mb
        b = prepare(D.collate(val[i:i + mb]), neg, m.gen.cfg.text_len, device)
        x0, cond, B = b["latent"], b["cond"], b["latent"].shape[0]
        rng = [torch.Generator(device).manual_seed(12345 + j) for j in range(i, i + B)]
        eps = noise_like(x0, rng)
        fake = eps - run(m.gen, eps, torch.ones(B, device=device), cond)
        for j, sig in enumerate(sigmas):
            s, n = torch.full((B,), sig, device=device), noise_like(x0, rng)
            d = disc(m, torch.cat([(1 - sig) * x0 + sig * n, (1 - sig) * fake + sig * n]), s.repeat(2),
                     {k: torch.cat([v, v]) for k, v in cond.items()})
            hits[j] += (d[:B] > d[B:]).sum() * (r + dp_rank < n_mb)
    dist.all_reduce(hits)  # the ranks of an sp group counted the same clips
    return {f"val_acc@{sig:g}": round(float(h) / cfg.sp / len(val), 4) for sig, h in zip(sigmas, hits.tolist())}


@torch.no_grad()
def preview(cfg, m, clips, neg, device, step, vae, tb):
    """Samples of the EMA on fixed conditions and noise, in student_steps steps: every rank runs the sharded forward,
    rank 0 decodes with the teacher's VAE (in tiles, to stay small beside training) and writes
    OUT/previews/<step>_<i>.mp4."""
    b = prepare(D.collate(clips), neg, m.ema.cfg.text_len, device)
    rng = [torch.Generator(device).manual_seed(777 + i) for i in range(len(clips))]
    x0 = student_generate(cfg, m.ema, noise_like(b["latent"], rng), b["cond"], rng)
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(cfg.out, "previews"), exist_ok=True)
        for i, video in enumerate(vae.decode(x0.float(), tile=32)):
            write_video(video, os.path.join(cfg.out, "previews", f"{step:08d}_{i}.mp4"))
            if tb:
                tb.add_video(f"preview_{i}", ((video.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).transpose(0, 1)[None],
                             step, fps=16)


# -----------------------------------------------------------------------------
# setup: process groups, models, sharding, data


def launch_env():
    """(rank, world size, local rank, init method): torchrun's environment, or else one process on a free local port."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), "env://"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return 0, 1, 0, f"tcp://127.0.0.1:{s.getsockname()[1]}"


def setup_dist(cfg, rank, world, local_rank, init_method):
    """nccl on GPU, gloo on CPU; nothing is written to os.environ, so main() can run again in one process.
    Returns (device, dp_rank, dp, sp_group, wait_group): wait_group, gloo with a timeout of wait_hours, is where ranks
    wait for one rank's long work, so the training collectives can keep a timeout that fits a step."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(minutes=cfg.timeout_min))
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(hours=cfg.wait_hours))
    if world % cfg.sp or world % (cfg.shard_ranks or world):
        fail(f"--sp={cfg.sp} and --shard_ranks={cfg.shard_ranks} must divide the world size {world}")
    groups = [dist.new_group(list(range(i * cfg.sp, (i + 1) * cfg.sp))) for i in range(world // cfg.sp)]
    sp_group = groups[rank // cfg.sp] if cfg.sp > 1 else None
    return torch.device("cuda" if cuda else "cpu"), rank // cfg.sp, world // cfg.sp, sp_group, wait_group


def compute_dtype(cfg, device):
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.param_dtype or ("bf16" if device.type == "cuda" else "fp32")]


def fsdp_mesh(cfg, device):
    """The device mesh FSDP2 shards over: every rank, or with shard_ranks n below the world size, HSDP's 2-D mesh of
    world / n replicas of n consecutive ranks (each model sharded within a replica: within a node, for n = its GPUs).
    None for one CPU process in fp32, which stays unsharded: FSDP would only add overhead there (about 1.5x)."""
    world = dist.get_world_size()
    n = cfg.shard_ranks or world
    if world == 1 and device.type == "cpu" and compute_dtype(cfg, device) == torch.float32:
        return None
    if n == world:
        return torch.distributed.device_mesh.init_device_mesh(device.type, (world,))
    return torch.distributed.device_mesh.init_device_mesh(device.type, (world // n, n), mesh_dim_names=("replicate", "shard"))


def shard(model, mesh, dtype):
    """FSDP2 over the mesh: one unit per DiT block (as official), the rest in the root unit; compute in dtype, grads
    reduced in fp32. No mesh: the model as it is."""
    if mesh is None:
        return model
    # the model casts its own inputs (the residual stream stays fp32), so FSDP must not
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@torch.no_grad()
def fill(model, state):
    """Copy into each parameter its rank's rows of the full tensor state[name] (FSDP2 shards dim 0 as torch.chunk does),
    cast to its dtype. With memory-mapped views in state, a rank reads only its own rows and moves only them (cast
    first, so a bf16 parameter moves half the bytes) to its device."""
    for name, p in model.named_parameters():
        full = state[name]
        if isinstance(p, DTensor):  # the mesh dim it is sharded over (HSDP replicates over the other)
            d = next(i for i, pl in enumerate(p.placements) if pl.is_shard())
            rows, r = full.chunk(p.device_mesh.size(d)), p.device_mesh.get_local_rank(d)
            full, p = rows[r] if r < len(rows) else full[:0], p.to_local()
        p.copy_(full.to(p.dtype))


def sharded_dit(cfg, device, sp_group, mesh, dtype=torch.float32, lora_rank=0):
    """--teacher's DiT sharded over every rank without a full copy on any: built on the meta device, sharded, then
    each rank fills its own shards from the memory-mapped file (checked against the official layout), stored in
    dtype. lora_rank: with the fake score's LoRAs (fp32, trained), drawn from the global RNG alike on every rank."""
    src = WanModel.from_pretrained(cfg.teacher)  # views of the file: the pages a rank reads are its own rows
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = WanModel(src.cfg).requires_grad_(False)
            if lora_rank:
                add_lora(model, lora_rank)
    finally:
        torch.set_default_dtype(default)
    init = lora_init(model)
    model.grad_ckpt, model.sp_group = cfg.grad_ckpt, sp_group
    shard(model, mesh, compute_dtype(cfg, device))
    model.to_empty(device=device)
    fill(model, dict(src.named_parameters()) | init)
    return model


def tap_blocks(n_layers, k):
    """The k blocks whose outputs D reads, evenly spaced and ending at the last: 9, 19, 29, 39 of 40."""
    return sorted({max(0, (i + 1) * n_layers // k - 1) for i in range(k)})


class Models:
    """The generator G, its EMA E, the teacher T with the fake-score LoRA, the discriminator heads, the D backbone.
    G and E hold fp32 weights (E's 0.995 update moves a weight by 0.005 of a difference that bf16's 8 bits would
    round away); the frozen teacher is kept in the compute dtype, its LoRA in fp32. The heads compute in fp32 (they
    are under 1% of D's FLOPs, and STR1's finite difference D(x + delta) - D(x) is below bf16's resolution)."""

    def __init__(self, cfg, device, sp_group):
        mesh = fsdp_mesh(cfg, device)
        self.gen = sharded_dit(cfg, device, sp_group, mesh).requires_grad_(True).train()
        self.ema = sharded_dit(cfg, device, sp_group, mesh)
        self.teacher = sharded_dit(cfg, device, sp_group, mesh, compute_dtype(cfg, device), cfg.lora_rank)
        taps = tap_blocks(self.gen.cfg.num_layers, cfg.disc_taps)
        self.disc = Discriminator(self.gen.cfg.dim, taps, cfg.disc_width, cfg.disc_queries, cfg.semantic)
        shard(self.disc, mesh, torch.float32)
        self.live = sharded_dit(cfg, device, sp_group, mesh) if cfg.disc_backbone == "live" else None  # synced to G
        self.backbone = {"ema": self.ema, "live": self.live, "teacher": self.teacher}[cfg.disc_backbone]


@functools.lru_cache(maxsize=2)
def epoch_order(seed, n, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def stream_position(cfg, step):
    """Clips drawn before `step` from the run's clip stream: a Phase I step draws batch_size, a Phase II step
    disc_steps x batch_size."""
    return cfg.batch_size * (min(step, cfg.phase1_steps) + cfg.disc_steps * max(0, step - cfg.phase1_steps))


def micro_batches(cfg, dataset, first, dp_rank, dp):
    """This rank's micro-batches of the global batch at `first` in the run's clip stream, each as (batch, its clips'
    positions). The stream is one order whatever the topology: position q is clip randperm(N) at q % N, seeded with
    seed + q // N; micro-batch g of the global batch goes to data-parallel rank g % dp."""
    n, mb = len(dataset), cfg.micro_batch
    out = []
    for g in range(dp_rank, cfg.batch_size // mb, dp):
        pos = range(first + g * mb, first + (g + 1) * mb)
        out.append((D.collate([dataset[epoch_order(cfg.seed, n, q // n)[q % n]] for q in pos]), pos))
    return out


def clip_rngs(cfg, positions, role, device):
    """One generator per clip, seeded by the run's seed, the clip's position in the stream and the kind of step
    (role: 0 Phase I, 1 D, 2 G), so every draw for a clip is the same on any number of ranks, sp or micro_batch."""
    return [torch.Generator(device).manual_seed(cfg.seed * 2**42 + 4 * q + role) for q in positions]


def prepare(batch, neg, text_len, device):
    """A Loader batch -> latent, condition dict and negative condition on the device (contexts padded to text_len)."""
    pad = lambda c: F.pad(c, (0, 0, 0, text_len - c.shape[-2]))
    cond = {"context": pad(batch["context"]).to(device)}
    if "y" in batch:
        cond["y"], cond["clip_fea"] = batch["y"].to(device), batch["clip"].to(device)
    B = batch["latent"].shape[0]
    return {"latent": batch["latent"].to(device), "cond": cond,
            "neg": {"context": pad(neg)[None].expand(B, -1, -1).to(device)}}


# -----------------------------------------------------------------------------
# checkpoints: torch.distributed.checkpoint into ckpt_<step>.tmp, renamed once complete


def ckpts(out):
    """The complete checkpoints in out, oldest first."""
    return sorted(d for d in os.listdir(out) if re.fullmatch(r"ckpt_\d{8}", d)) if os.path.isdir(out) else []


def latest_ckpt(out):
    done = ckpts(out)
    return os.path.join(out, done[-1]) if done else None


def prune(out, keep):
    for old in ckpts(out)[:-keep]:
        shutil.rmtree(os.path.join(out, old))


def train_state(m, opts):
    state = {}
    for name, mdl, opt in (("gen", m.gen, opts["gen"]), ("disc", m.disc, opts["disc"]), ("lora", m.teacher, opts["fake"])):
        state[name], state["opt_" + name] = get_state_dict(mdl, opt, options=StateDictOptions(ignore_frozen_params=True))
    state["ema"] = get_state_dict(m.ema, [])[0]
    return state


def save_ckpt(cfg, m, opts, step, group, extra):
    """Start writing OUT/ckpt_<step>: with async_ckpt, dcp.async_save copies the state to CPU memory, then a thread
    writes it while training goes on. Returns finish(), which waits for the write and then renames the checkpoint
    into place (resume only ever sees complete ones) and prunes. DCP's coordination and these waits run on the gloo
    wait group."""
    rank, final = dist.get_rank(), os.path.join(cfg.out, f"ckpt_{step:08d}")
    tmp = final + ".tmp"
    save = dcp.async_save if cfg.async_ckpt else dcp.save
    written = save(train_state(m, opts), checkpoint_id=tmp, process_group=group)

    def finish():
        if cfg.async_ckpt:
            written.result()
        if rank == 0:  # the step, the count of skipped steps and the model's shape: the rest follows from the step
            D.write_json(extra, os.path.join(tmp, "state.json"))
            D.write_json(dataclasses.asdict(cfg), os.path.join(tmp, "config.json"))
        dist.barrier(group)
        if rank == 0:
            os.replace(tmp, final)
            prune(cfg.out, cfg.keep_ckpts)
        dist.barrier(group)
    return finish


# Fields a resumed run must share with its checkpoint: the data and noise follow from them, or the saved state's
# shapes do; from Phase II on, also the heads' and Phase II's. The others may change; the change is printed.
FIXED = ("seed", "batch_size", "phase1_steps", "lora_rank")
FIXED_PHASE2 = ("phase2_steps", "disc_steps", "disc_backbone", "disc_taps", "disc_queries", "disc_width", "semantic")


def check_resume(cfg, path, extra, model_cfg):
    """Refuse, in one line, a resume that changes a fixed field or the teacher's shape; print what else changed."""
    with open(os.path.join(path, "config.json")) as f:
        old = json.load(f)
    fixed = FIXED + FIXED_PHASE2 * (extra["step"] > cfg.phase1_steps or cfg.gan_weight > 0)
    bad = [f"--{k}={old[k]} (now {getattr(cfg, k)})" for k in fixed if old.get(k, getattr(cfg, k)) != getattr(cfg, k)]
    if extra["model"] != json.loads(json.dumps(dataclasses.asdict(model_cfg))):  # as saved: tuples become lists
        bad.append(f"--teacher={old['teacher']} (now {cfg.teacher}, another model)")
    if bad:
        fail(f"{path} was written with {', '.join(bad)}: these cannot change on resume; pass the checkpoint's values "
             f"or another --out")
    changed = [f"--{k}={getattr(cfg, k)} (was {old[k]})" for k in old
               if k not in fixed and k in cfg.__dict__ and old[k] != getattr(cfg, k)]
    if changed and dist.get_rank() == 0:
        print(f"resuming {path} with " + ", ".join(changed))


def load_ckpt(path, m, opts, cfg, group):
    """Restore every model and optimizer. The heads train only in Phase II (gan_weight: also in I), so from before it
    they are left as this run built them: a shared Phase I can start runs whose heads differ (width, taps, ...)."""
    if not os.path.isfile(os.path.join(path, "state.json")):
        fail(f"{path} has no state.json: it was written by an older distill.py, which this one cannot resume; "
             "use another --out")
    with open(os.path.join(path, "state.json")) as f:
        extra = json.load(f)
    check_resume(cfg, path, extra, m.gen.cfg)
    parts = [("gen", m.gen, opts["gen"]), ("disc", m.disc, opts["disc"]), ("lora", m.teacher, opts["fake"])]
    parts = [p for p in parts if p[0] != "disc" or extra["step"] > cfg.phase1_steps or cfg.gan_weight]
    state = {k: v for k, v in train_state(m, opts).items() if k.removeprefix("opt_") in {p[0] for p in parts} | {"ema"}}
    dcp.load(state, checkpoint_id=path, process_group=group)
    for name, mdl, opt in parts:
        set_state_dict(mdl, opt, model_state_dict=state[name], optim_state_dict=state["opt_" + name],
                       options=StateDictOptions(ignore_frozen_params=True, strict=name != "lora"))
    set_state_dict(m.ema, [], model_state_dict=state["ema"], optim_state_dict={})
    return extra


def export_student(cfg, ema, path, group):
    """The EMA generator as one safetensors file with the official key names, plus the teacher's config.json beside
    it (sample.py --student reads both)."""
    from safetensors.torch import save_file
    sd = get_state_dict(ema, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
    if dist.get_rank() == 0:
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.export_dtype]
        D.atomic(path, lambda tmp: save_file({k: v.to(dt).contiguous() for k, v in sd.items()}, tmp))
        shutil.copy(os.path.join(cfg.teacher, "config.json"), os.path.join(os.path.dirname(path), "config.json"))
        print(f"exported the EMA generator to {path}")
    dist.barrier(group)  # while rank 0 writes


def export_from(cfg, device, sp_group, group):
    """--export_from=OUT/ckpt_N: the checkpoint's EMA as OUT/student_N.safetensors, without training. The teacher and
    the checkpoint's own fields come from its config.json unless given."""
    path = cfg.export_from.rstrip("/")
    m = re.fullmatch(r"ckpt_(\d{8})", os.path.basename(path))
    if not m or not os.path.isfile(os.path.join(path, "state.json")):
        fail(f"--export_from={cfg.export_from!r} is not a complete checkpoint folder (OUT/ckpt_<8 digits>)")
    out = os.path.join(os.path.dirname(path), f"student_{m[1]}.safetensors")
    if os.path.exists(out):
        fail(f"{out} exists: delete it to export again")
    with open(os.path.join(path, "config.json")) as f:
        cfg.teacher = cfg.teacher or json.load(f)["teacher"]
    ema = sharded_dit(cfg, device, sp_group, fsdp_mesh(cfg, device))
    state = {"ema": get_state_dict(ema, [])[0]}
    dcp.load(state, checkpoint_id=path, process_group=group)
    set_state_dict(ema, [], model_state_dict=state["ema"], optim_state_dict={})
    export_student(cfg, ema, out, group)


def export_lora(cfg):
    """--export_lora=RANK: OUT/student.safetensors as a LoRA of --teacher (lora_state) in
    OUT/student_lora_rank{RANK}.safetensors. A RANK of at least the model width is exact (full rank)."""
    from safetensors.torch import save_file
    student = os.path.join(cfg.out, "student.safetensors")
    out = os.path.join(cfg.out, f"student_lora_rank{cfg.export_lora}.safetensors")
    if cfg.export_lora < 0:
        sys.exit(f"--export_lora={cfg.export_lora}: give a rank of at least 1")
    if not os.path.isfile(student):
        sys.exit(f"{student} not found: --out must be a finished distill.py run (or a folder with its student)")
    if os.path.exists(out):
        sys.exit(f"{out} exists: delete it to export again")
    try:
        teacher = WanModel.from_pretrained(cfg.teacher)  # both memory-mapped; each difference is made in turn
        sd = lora_state(teacher, WanModel.from_pretrained(cfg.teacher, weights=student), cfg.export_lora,
                        {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.export_dtype])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"distill.py --export_lora: {e}")
    D.atomic(out, lambda f: save_file(sd, f))
    pairs, low = sum(k.endswith(".lora_up.weight") for k in sd), sum(k.endswith(".alpha") for k in sd)
    print(f"wrote {out}: {low} rank-{cfg.export_lora} pairs in the blocks, {pairs - low} exact pairs outside, "
          f"{len(sd) - 2 * pairs - low} full differences, {os.path.getsize(out) / 2**20:.1f} MiB")
    return out


# -----------------------------------------------------------------------------
# the loop


def main(argv, launch=None):
    """launch: (rank, world size, local rank, init method); default launch_env(). In-process callers pass nothing."""
    cfg = parse_args(argv)
    if cfg.export_lora:
        return export_lora(cfg)
    if not cfg.export_from and not (cfg.teacher and cfg.data):
        fail("--teacher and --data are required, e.g. distill.py --teacher=assets/demo --data=latents/ --out=run/ "
             "(distill.py --help lists every field)")
    device, dp_rank, dp, sp_group, wait_group = setup_dist(cfg, *(launch or launch_env()))
    world, master = dist.get_world_size(), dist.get_rank() == 0
    if cfg.export_from:
        export_from(cfg, device, sp_group, wait_group)
        return dist.destroy_process_group()
    if not os.path.isfile(os.path.join(cfg.teacher, "config.json")):
        fail(f"--teacher={cfg.teacher!r} is not a Wan2.1 checkpoint directory (no config.json)")
    if os.path.exists(os.path.join(cfg.out, "student.safetensors")):
        fail(f"{cfg.out}/student.safetensors exists: this run has finished; pick another --out")
    if cfg.batch_size % (dp * cfg.micro_batch):
        fail(f"--batch_size={cfg.batch_size} must be a multiple of data-parallel ranks ({dp}) x micro_batch ({cfg.micro_batch})")
    accum = cfg.batch_size // (dp * cfg.micro_batch)
    data_dir = cfg.data
    try:
        if not D.is_precomputed(data_dir):  # a video folder: precompute latents once, the clips split over the ranks
            data_dir = D.precompute(cfg.teacher, cfg.data, os.path.join(cfg.out, "latents"), device=device.type,
                                    group=wait_group)
        dataset = D.LatentDataset(data_dir)
        vds = D.LatentDataset(cfg.val_data) if cfg.val_data else None
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e}" + ("" if D.is_precomputed(cfg.data) or isinstance(e, (FileNotFoundError, D.NoClips)) else
                       "; for other frames or sizes, precompute with data.py and pass its --out as --data"))
    os.makedirs(cfg.out, exist_ok=True)
    if vds and vds.model_type != dataset.model_type:
        fail(f"--val_data={cfg.val_data!r} holds {vds.model_type} clips but --data holds {dataset.model_type}")
    val = [vds[i] for i in range(min(len(vds), cfg.val_clips))] if vds else []
    shown = [(vds or dataset)[i] for i in range(min(len(vds or dataset), cfg.preview_clips) * (cfg.preview_every > 0))]
    if len(dataset) < dp * cfg.micro_batch:
        fail(f"{data_dir} holds {len(dataset)} clips; --batch_size={cfg.batch_size} is accumulated from micro-batches of "
             f"{cfg.micro_batch} on each of {dp} data-parallel ranks, which need at least {dp * cfg.micro_batch}: "
             "precompute more clips")

    torch.manual_seed(cfg.seed)  # identical initial heads and LoRA on every rank
    m = Models(cfg, device, sp_group)
    if m.gen.cfg.model_type != dataset.model_type:
        fail(f"the data in {data_dir} is {dataset.model_type} but the teacher is {m.gen.cfg.model_type}")
    opts = {"gen": torch.optim.Adam(m.gen.parameters(), lr=cfg.lr_phase1),
            "fake": torch.optim.Adam([p for p in m.teacher.parameters() if p.requires_grad], lr=cfg.lr_fake),
            "disc": torch.optim.Adam(m.disc.parameters(), lr=cfg.lr_disc, betas=(cfg.beta1, cfg.beta2))}

    x = dataset[0]["latent"]
    tokens = x.shape[1] * x.shape[2] * x.shape[3] // 4
    if master:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        print(f"world {world} = {dp} data-parallel x {cfg.sp} sequence-parallel; {accum} micro-batches of "
              f"{cfg.micro_batch} per step; {tokens} tokens per clip; {len(dataset)} clips")

    # Materialise every Adam state now (get_state_dict does it with a zero-lr step) and reset its step count,
    # so a fresh run and a resumed one hold the same state whenever a checkpoint happens to be taken.
    train_state(m, opts)
    for opt in opts.values():
        for st in opt.state.values():
            st["step"].zero_()
    step, bad = 0, 0
    ck = latest_ckpt(cfg.out)
    if ck:
        extra = load_ckpt(ck, m, opts, cfg, wait_group)
        step, bad = extra["step"], extra["bad"]
    if master:
        print(f"resumed from {ck} at step {step}" if ck else f"no checkpoint in {cfg.out}: starting at step 0")

    stop = {"now": False}

    def on_signal(*_):  # preemption (SIGTERM) or Ctrl-C (SIGINT): finish the step, save, exit 0; a 2nd Ctrl-C aborts
        stop["now"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if master and os.path.exists(log_path):  # a restart redoes the steps after its checkpoint: drop their lines
        with open(log_path) as f:
            keep = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        D.write_text("".join(keep), log_path)
    log = open(log_path, "a") if master else None
    tb = None
    if cfg.tensorboard and master:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(cfg.out, "tb"))
        except ImportError:
            print("--tensorboard=true but tensorboard is not installed (pip install tensorboard): logging to log.jsonl only")
    total, sums, n_log, start, vae, writing = cfg.phase1_steps + cfg.phase2_steps, {}, 0, step, None, None

    def opt_step(name, params):
        """Average the accumulated grads, clip their global norm; step unless it is not finite."""
        nonlocal bad
        params = [p for p in params if p.grad is not None]
        for p in params:
            p.grad.div_(accum)
        norm = clip_grads(params, cfg.grad_clip)
        ok = bool(torch.isfinite(norm))  # the norm is global, so every rank decides alike
        if ok:
            opts[name].step()
        else:
            bad += 1
            if master:
                print(f"step {step}: non-finite {name} gradient, step skipped ({bad}/{cfg.max_bad_steps})")
        opts[name].zero_grad(set_to_none=True)
        return {f"gnorm_{name}": norm.detach(), f"skipped_{name}": float(not ok)}

    while step < total:
        t0 = time.perf_counter()
        phase = 1 if step < cfg.phase1_steps else 2
        if step == cfg.phase1_steps:  # Phase II: the generator's lr and betas change; its Adam state carries over
            for g in opts["gen"].param_groups:
                g["lr"], g["betas"] = cfg.lr_phase2, (cfg.beta1, cfg.beta2)
        stats = {}
        prep = lambda b: prepare(b, dataset.neg_context, m.gen.cfg.text_len, device)  # noqa: E731
        first = stream_position(cfg, step)
        if phase == 1:
            for b, pos in micro_batches(cfg, dataset, first, dp_rank, dp):
                for k, v in phase1_step(cfg, m, prep(b), clip_rngs(cfg, pos, 0, device)).items():
                    stats[k] = stats.get(k, 0) + v / accum
            stats |= opt_step("gen", m.gen.parameters()) | opt_step("fake", opts["fake"].param_groups[0]["params"])
            stats |= opt_step("disc", m.disc.parameters()) if cfg.gan_weight else {}
        else:
            if m.live is not None:
                ema_update(m.live, m.gen, 0.0)
            opts["disc"].zero_grad(set_to_none=True)
            for d in range(cfg.disc_steps):  # discriminator steps, then a generator step on the last one's clips
                batches = [(prep(b), pos) for b, pos in
                           micro_batches(cfg, dataset, first + d * cfg.batch_size, dp_rank, dp)]
                for b, pos in batches:
                    for k, v in phase2_d_step(cfg, m, b, clip_rngs(cfg, pos, 1, device)).items():
                        stats[k] = stats.get(k, 0) + v / accum / cfg.disc_steps
                stats |= opt_step("disc", m.disc.parameters())
            for b, pos in batches:
                for k, v in phase2_g_step(cfg, m, b, clip_rngs(cfg, pos, 2, device)).items():
                    stats[k] = stats.get(k, 0) + v / accum
            opts["disc"].zero_grad(set_to_none=True)  # L_G reached the heads' parameters: never used
            stats |= opt_step("gen", m.gen.parameters())
        if not stats["skipped_gen"]:
            ema_update(m.ema, m.gen, cfg.ema)
        step += 1
        dt = time.perf_counter() - t0
        for k, v in stats.items():
            sums[k] = sums.get(k, 0) + float(v)
        sums["step_s"], n_log = sums.get("step_s", 0) + dt, n_log + 1
        if bad >= cfg.max_bad_steps or (step - start == cfg.stop_after and step < total):
            stop["now"] = True
        flag = torch.tensor([float(stop["now"])], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank's SIGTERM stops all of them together
        val_stats = disc_accuracy(cfg, m, val, dataset.neg_context, device, dp_rank, dp) if val and phase == 2 and (
            (step - cfg.phase1_steps) % cfg.val_every == 0 or step == total) else {}
        if step % cfg.log_every == 0 or step == total or flag.item() or val_stats:
            vals = torch.tensor([sums[k] / n_log for k in sorted(sums)], device=device)
            dist.all_reduce(vals)
            rec = {"step": step, "phase": phase} | {k: round(v / world, 6) for k, v in zip(sorted(sums), vals.tolist())}
            rec["tokens_per_s"] = round(cfg.batch_size * tokens / rec["step_s"], 1)
            rec |= val_stats
            rec["peak_mem_gib"] = round((torch.cuda.max_memory_allocated() if device.type == "cuda" else
                                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 3)
            if master:
                print(json.dumps(rec), flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                for k, v in rec.items() if tb else ():
                    tb.add_scalar(k, v, step)
            sums, n_log = {}, 0
        if cfg.preview_every and (step % cfg.preview_every == 0 or step == total):
            vae = vae or (WanVAE.from_pretrained(os.path.join(cfg.teacher, VAE_FILE), device=device) if master else None)
            preview(cfg, m, shown, dataset.neg_context, device, step, vae, tb)
        if step % cfg.ckpt_every == 0 or step == total or flag.item():
            if writing:
                writing()  # the previous checkpoint's write
            writing = save_ckpt(cfg, m, opts, step, wait_group, {"step": step, "bad": bad,
                                                                    "model": dataclasses.asdict(m.gen.cfg)})
            if flag.item() or step == total:
                writing = writing()
        if flag.item():
            if master:
                print(f"stopped at step {step}: " + ("too many non-finite losses; lower the lr or check the data"
                                                     if bad >= cfg.max_bad_steps else "checkpoint saved; rerun to resume"))
            dist.destroy_process_group()
            sys.exit(1 if bad >= cfg.max_bad_steps else 0)
    export_student(cfg, m.ema, os.path.join(cfg.out, "student.safetensors"), wait_group)
    if master:
        prune(cfg.out, cfg.keep_ckpts)  # as during the run: the newest alone can continue it
    for f in (log, tb):  # closed here: under torchrun the process ends with os._exit (D.end_rank)
        if f is not None:
            f.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C before the first step (after it, the step finishes and a checkpoint is saved)
        sys.exit("distill.py: interrupted before the first step; nothing to save" if os.environ.get("RANK", "0") == "0"
                 else 130)
    D.end_rank()
