"""vpae tests: tiny configs, random weights in the official file formats, CPU, seconds."""
import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

import data
import encoders
import model as M
import sample
import vae
from encoders import CLIPVision, T5Encoder, clean_text, rel_bucket
from model import WanConfig, WanModel
from vae import WanVAE

HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# DiT: helpers


def tiny_cfg(model_type="t2v", **kw):
    # text_dim / clip_dim / text_len are left at the official values so config.json alone describes the model
    kw = dict(dict(in_dim=16 if model_type == "t2v" else 36, dim=64, ffn_dim=96, num_heads=4, num_layers=2), **kw)
    return replace(M.WanConfig(), model_type=model_type, **kw)


def random_model(cfg, seed=0):
    """A model with every parameter random (the official init zeroes the head, which would hide bugs)."""
    torch.manual_seed(seed)
    m = M.WanModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1)
    return m.eval()


def inputs(cfg, B=2, F_=3, H=4, W=6, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, F_, H, W, generator=g)
    t = torch.tensor([999, 250])[:B]
    ctx = torch.randn(B, L, cfg.text_dim, generator=g)
    kw = {}
    if cfg.model_type != "t2v":
        n = 514 if cfg.model_type == "flf2v" else 257
        kw = dict(clip_fea=torch.randn(B, n, cfg.clip_dim, generator=g), y=torch.randn(B, 20, F_, H, W, generator=g))
    return x, t, ctx, kw


def write_official(model, path, shards=1):
    """Write `model` in the official layout: config.json + one safetensors file or shards with an index."""
    os.makedirs(path, exist_ok=True)
    cfg = model.cfg
    keys = ["dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len"]
    conf = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": cfg.model_type,
            **{k: getattr(cfg, k) for k in keys}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"))
        return
    names, wmap = sorted(sd), {}
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[i::shards]}
        save_file(part, os.path.join(path, fname))
        wmap.update({k: fname for k in part})
    with open(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wmap}, f)


# -----------------------------------------------------------------------------
# An independent Wan forward, written op by op in the official code's style
# (complex float64 RoPE, per-axis tables of 1024 positions, einsum unpatchify), reading only the state dict.


def ref_forward(sd, cfg, x, t, ctx, clip_fea=None, y=None):
    D, n = cfg.dim, cfg.num_heads
    d = D // n
    lin = lambda p, a: a @ sd[p + ".weight"].T + sd[p + ".bias"]
    ln = lambda a, eps=1e-6: F.layer_norm(a, a.shape[-1:], eps=eps)
    rms = lambda a, w: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    gelu_tanh = lambda a: 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))

    def table(dim):  # rope_params: polar(1, pos * theta^(-2j/dim)) for 1024 positions
        th = 1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return torch.polar(torch.ones(1024, dim // 2, dtype=torch.float64), torch.outer(torch.arange(1024.0, dtype=torch.float64), th))

    freqs = torch.cat([table(d - 4 * (d // 6)), table(2 * (d // 6)), table(2 * (d // 6))], dim=1)
    c = d // 2
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)

    if y is not None:
        x = torch.cat([x, y], 1)
    x = F.conv3d(x, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=(1, 2, 2))
    B, _, f, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    rot = torch.cat([ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1), fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                     fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)

    def rope(a):
        a = torch.view_as_complex(a.double().reshape(B, -1, n, d // 2, 2))
        return torch.view_as_real(a * rot).flatten(3).float()

    half = cfg.freq_dim // 2
    s = torch.outer(t.double(), torch.pow(10000, -torch.arange(half, dtype=torch.float64) / half))
    s = torch.cat([torch.cos(s), torch.sin(s)], 1).float()  # cos first
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", s)))
    e0 = lin("time_projection.1", F.silu(e)).view(B, 6, D)

    ctx = torch.cat([ctx, ctx.new_zeros(B, cfg.text_len - ctx.shape[1], ctx.shape[2])], 1)
    ctx = lin("text_embedding.2", gelu_tanh(lin("text_embedding.0", ctx)))
    if clip_fea is not None:
        a = clip_fea + sd["img_emb.emb_pos"] if "img_emb.emb_pos" in sd else clip_fea
        a = F.layer_norm(a, a.shape[-1:], sd["img_emb.proj.0.weight"], sd["img_emb.proj.0.bias"], 1e-5)
        a = lin("img_emb.proj.3", F.gelu(lin("img_emb.proj.1", a)))
        a = F.layer_norm(a, a.shape[-1:], sd["img_emb.proj.4.weight"], sd["img_emb.proj.4.bias"], 1e-5)
        ctx = torch.cat([a, ctx], 1)

    def attn(q, k, v):
        p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d), -1)
        return torch.einsum("bhlm,bmhd->blhd", p, v)

    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        m = (sd[p + "modulation"] + e0).chunk(6, dim=1)  # shift, scale, gate (sa) then shift, scale, gate (ffn)
        a = ln(x) * (1 + m[1]) + m[0]
        sa = p + "self_attn."
        q = rope(rms(lin(sa + "q", a), sd[sa + "norm_q.weight"]))
        k = rope(rms(lin(sa + "k", a), sd[sa + "norm_k.weight"]))
        v = lin(sa + "v", a).view(B, -1, n, d)
        x = x + lin(sa + "o", attn(q, k, v).flatten(2)) * m[2]
        a = F.layer_norm(x, x.shape[-1:], sd[p + "norm3.weight"], sd[p + "norm3.bias"], 1e-6)
        ca = p + "cross_attn."
        q = rms(lin(ca + "q", a), sd[ca + "norm_q.weight"]).view(B, -1, n, d)
        nimg = ctx.shape[1] - cfg.text_len  # the split is by count: image tokens first, then text_len text tokens
        txt, img = ctx[:, nimg:], ctx[:, :nimg]
        k = rms(lin(ca + "k", txt), sd[ca + "norm_k.weight"]).view(B, -1, n, d)
        o = attn(q, k, lin(ca + "v", txt).view(B, -1, n, d)).flatten(2)
        if nimg:
            k = rms(lin(ca + "k_img", img), sd[ca + "norm_k_img.weight"]).view(B, -1, n, d)
            o = o + attn(q, k, lin(ca + "v_img", img).view(B, -1, n, d)).flatten(2)
        x = x + lin(ca + "o", o)
        a = ln(x) * (1 + m[4]) + m[3]
        x = x + lin(p + "ffn.2", gelu_tanh(lin(p + "ffn.0", a))) * m[5]
    hm = (sd["head.modulation"] + e[:, None]).chunk(2, dim=1)  # the head uses e, not e0
    out = lin("head.head", ln(x) * (1 + hm[1]) + hm[0])
    out = out.view(B, f, h, w, 1, 2, 2, cfg.out_dim)
    return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(B, cfg.out_dim, f, 2 * h, 2 * w)


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_dit_matches_independent_reference(model_type):
    cfg = tiny_cfg(model_type)
    m = random_model(cfg)
    x, t, ctx, kw = inputs(cfg)
    with torch.no_grad():
        out = m(x, t, ctx, **kw)
        ref = ref_forward(m.state_dict(), cfg, x, t, ctx, **kw)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_rope_is_interleaved_with_22_21_21_split():
    # head_dim 128: pair j < 22 rotates with the frame index, 22..42 with the row, 43..63 with the column
    cos, sin = M.rope_angles(128, (2, 3, 4))
    ang = torch.atan2(sin, cos).view(2, 3, 4, 64)
    assert torch.allclose(ang[1, 0, 0, :22], torch.pow(10000, -torch.arange(0, 44, 2) / 44).float())
    assert ang[1, 0, 0, 22:].abs().max() == 0 and ang[0, 1, 0, :22].abs().max() == 0
    assert torch.allclose(ang[0, 1, 0, 22:43], torch.pow(10000, -torch.arange(0, 42, 2) / 42).float())
    assert torch.allclose(ang[0, 0, 1, 43:], torch.pow(10000, -torch.arange(0, 42, 2) / 42).float())


def test_sinusoid_cos_first():
    e = M.sinusoid(256, torch.tensor([0, 7]))
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))
    assert torch.allclose(e[1, 1], torch.cos(torch.tensor(7 * 10000 ** (-1 / 128), dtype=torch.float64)).float())


def test_taps_return_hidden_states_without_changing_output():
    cfg = tiny_cfg("i2v", num_layers=3)
    m = random_model(cfg)
    x, t, ctx, kw = inputs(cfg)
    with torch.no_grad():
        out = m(x, t, ctx, **kw)
        out2, hidden, c = m(x, t, ctx, taps=(0, 2), **kw)
    assert torch.equal(out, out2) and len(hidden) == 2 and hidden[0].shape == (2, 3 * 2 * 3, cfg.dim)
    assert c.shape == (2, 257 + cfg.text_len, cfg.dim)


def test_grad_ckpt_same_gradients():
    cfg = tiny_cfg("t2v")
    m = random_model(cfg).train()
    x, t, ctx, _ = inputs(cfg)
    grads = []
    for ck in (False, True):
        m.zero_grad()
        m.grad_ckpt = ck
        m(x, t.float(), ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# -----------------------------------------------------------------------------
# DiT: official-format loading


@pytest.mark.parametrize("model_type,shards", [("t2v", 1), ("i2v", 3), ("flf2v", 2)])
def test_official_roundtrip(tmp_path, model_type, shards):
    cfg = tiny_cfg(model_type)
    m = random_model(cfg)
    write_official(m, tmp_path / "ckpt", shards)
    loaded = M.WanModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg == cfg
    x, t, ctx, kw = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx, **kw), m(x, t, ctx, **kw))
    bf = M.WanModel.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert bf.blocks[0].ffn[0].weight.dtype == torch.bfloat16 and bf.head.head.weight.dtype == torch.float32
    with torch.no_grad():
        assert (bf(x, t, ctx, **kw) - m(x, t, ctx, **kw)).abs().max() < 0.1 * m(x, t, ctx, **kw).abs().max()


def test_load_errors_name_the_problem(tmp_path):
    cfg = tiny_cfg("i2v")
    m = random_model(cfg)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    write_official(m, tmp_path / "a")
    del sd["blocks.1.cross_attn.k_img.weight"]
    sd["blocks.0.ffn.0.bias"] = torch.zeros(5)
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as e:
        M.WanModel.from_pretrained(tmp_path / "a")
    msg = str(e.value)
    assert "missing blocks.1.cross_attn.k_img.weight" in msg and "unexpected extra.weight" in msg
    assert "blocks.0.ffn.0.bias is (5,), expected (96,)" in msg

    write_official(m, tmp_path / "b", shards=2)
    os.remove(tmp_path / "b" / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="00002-of-00002.safetensors"):
        M.WanModel.from_pretrained(tmp_path / "b")

    write_official(m, tmp_path / "c", shards=2)
    f = tmp_path / "c" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(ValueError, match="00001-of-00002.safetensors is truncated"):
        M.WanModel.from_pretrained(tmp_path / "c")

    with pytest.raises(FileNotFoundError, match="config.json"):
        M.WanModel.from_pretrained(tmp_path / "nothing")


def test_bad_inputs_are_clear():
    cfg = tiny_cfg("i2v")
    m = random_model(cfg)
    x, t, ctx, kw = inputs(cfg)
    with pytest.raises(ValueError, match="needs clip_fea and y"):
        m(x, t, ctx)
    with pytest.raises(ValueError, match="at most text_len"):
        m(x, t, torch.zeros(2, cfg.text_len + 1, cfg.text_dim), **kw)
    with pytest.raises(ValueError, match="divisible by the patch"):
        m(x[..., :5], t, ctx, clip_fea=kw["clip_fea"], y=kw["y"][..., :5])


def test_loading_peak_memory(tmp_path):
    """Peak RSS while loading (and touching every weight) stays within 1.25x the checkpoint size + the baseline."""
    cfg = replace(tiny_cfg("t2v"), dim=512, ffn_dim=2048, num_heads=4, num_layers=8)  # ~ 150 MB fp32
    write_official(M.WanModel(cfg), tmp_path / "big", shards=2)
    out = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "load", str(tmp_path / "big")],
                         capture_output=True, text=True, cwd=HERE, check=True).stdout
    ratio = float(out.split("peak/size=")[1].split(",")[0])
    assert ratio < 1.25, out


def test_sequence_parallel_matches_single_process(tmp_path):
    """2 ranks on gloo, Ulysses over both: the output and the (rank-summed) gradients equal one process."""
    cfg = tiny_cfg("i2v")
    write_official(random_model(cfg), tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(HERE, "test_vpae.py"), "sp", str(tmp_path / "ckpt")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300)
    assert out.returncode == 0 and out.stdout.count("SP OK") == 2, out.stdout + out.stderr


def sp_worker(ckpt):
    import torch.distributed as dist
    dist.init_process_group("gloo")
    m = M.WanModel.from_pretrained(ckpt).requires_grad_(True)
    x, t, ctx, kw = inputs(m.cfg, F_=3, H=2, W=6)  # 9 tokens: rank 1 holds one padding token
    results = []
    for sp in (None, dist.group.WORLD):
        m.sp_group = sp
        m.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = m(xx, t, ctx, **kw)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters()] + [xx.grad.flatten()])
        if sp is not None:
            dist.all_reduce(g)
            g /= 2  # every rank computed the same loss, so its chunk's gradient came back twice
        results.append((out.detach(), g))
    (o1, g1), (o2, g2) = results
    assert (o1 - o2).abs().max() < 1e-5 * o1.abs().max(), (o1 - o2).abs().max()
    assert (g1 - g2).abs().max() < 1e-4 * g1.abs().max(), (g1 - g2).abs().max()
    print("SP OK")
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# distill.py: each loss term against a direct computation


def test_hinge_and_str1():
    import distill
    assert torch.isclose(distill.hinge_d(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.3])), torch.tensor(0.9))
    rng = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]  # one per clip
    x = torch.zeros(2, 3, 4, 5, 6)
    d = distill.str1_delta(x, 0.0, 0.1, rng)  # temporal part alone: constant over H and W, varies over frames
    assert torch.equal(d, d[..., :1, :1].expand_as(d)) and d[0, 0, 0, 0, 0] != d[0, 0, 1, 0, 0] != d[1, 0, 1, 0, 0]
    d = distill.str1_delta(x, 0.01, 0.1, rng)
    a = torch.randn(3, 4, 5, 6)
    D = lambda v: (v * a).sum(dim=(1, 2, 3, 4))  # a linear "discriminator": D(x + d) - D(x) = a . d
    ref = ((d * a).sum(dim=(1, 2, 3, 4)) ** 2).mean() / (d**2).mean()
    assert torch.isclose(distill.str1_loss(D(x + d), D(x), d), ref)


def test_dmd_gradient_and_csds_target():
    import distill
    g = torch.Generator().manual_seed(0)
    x0_hat, real, fake = (torch.randn(2, 4, 2, 3, 3, generator=g) for _ in range(3))
    x0_hat.requires_grad_(True)
    distill.dmd_loss(x0_hat, real, fake).backward()
    norm = (x0_hat - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    # d/dx 1/2 mean((x - sg(x - grad))^2) = grad / numel, with grad = (fake - real) / mean|x - real|
    assert torch.allclose(x0_hat.grad, (fake - real) / norm / x0_hat.numel(), atol=1e-7)

    # CFG velocity: v(c_neg) + w (v(c) - v(c_neg)), on a teacher whose velocity is x * mean(context)
    teacher = lambda x, t, ctx, clip, y: x * ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + t.view(-1, 1, 1, 1, 1)
    x, s = torch.randn(2, 4, 1, 2, 2, generator=g), torch.tensor([0.3, 0.8])
    c, n = torch.full((2, 3, 5), 2.0), torch.full((2, 3, 5), -1.0)
    v = distill.cfg_velocity(teacher, x, s, {"context": c}, {"context": n}, 5.0)
    v_c, v_n = 2 * x + 1000 * s.view(-1, 1, 1, 1, 1), -x + 1000 * s.view(-1, 1, 1, 1, 1)
    assert torch.allclose(v, v_n + 5.0 * (v_c - v_n))
    target = x - s.view(-1, 1, 1, 1, 1) * v  # the C-SDS target x0 of the CFG teacher
    assert torch.allclose(distill.cfg_x0(teacher, x, s, {"context": c}, {"context": n}, 5.0), target)
    x0 = torch.randn(x.shape, generator=g)
    assert torch.isclose(distill.csds_loss(x0, target), ((x0 - target) ** 2).mean())

    # a guidance interval: w 7.5 at sigma' < 0.5 only (s = 0.3, 0.8); off, every sample gets guide_scale
    cfg = distill.Config(csds_guide_scale=7.5, csds_guide_until=0.5)
    v = distill.cfg_velocity(teacher, x, s, {"context": c}, {"context": n}, distill.csds_guidance(cfg, s))
    assert torch.allclose(v[0], (v_n + 7.5 * (v_c - v_n))[0]) and torch.allclose(v[1], (v_n + 5.0 * (v_c - v_n))[1])
    assert distill.csds_guidance(distill.Config(), s) == 5.0


def test_clip_grads():
    import distill
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    p.grad, q.grad = torch.full((3,), 4.0), torch.zeros(4)
    q.grad[0] = 6.0  # global norm sqrt(3 * 16 + 36) = sqrt(84)
    assert float(distill.clip_grads([p, q], 2.0)) == pytest.approx(84**0.5)
    assert float(torch.cat([p.grad, q.grad]).norm()) == pytest.approx(2.0, rel=1e-5)
    assert float(distill.clip_grads([p, q], 0)) == pytest.approx(2.0, rel=1e-5)  # 0: measured, not clipped
    assert float(torch.cat([p.grad, q.grad]).norm()) == pytest.approx(2.0, rel=1e-5)


def test_ema_update():
    import distill
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expect = [0.995 * pa.detach() + 0.005 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    distill.ema_update(a, b, 0.995)
    assert all(torch.allclose(e, p) for e, p in zip(expect, a.parameters()))


def test_fake_score_is_an_explicit_switch_and_recomputes_as_it_ran():
    """The fake score's LoRAs act only within distill.fake_score; with grad_ckpt, a block recomputes during the
    backward as its forward ran, wherever the backward runs (with the old forward hook on a shared switch, a backward
    after the switch went off recomputed the teacher: the LoRAs' gradient came out wrong)."""
    import distill
    cfg = tiny_cfg("t2v")
    teacher = random_model(cfg, 0)
    plain = random_model(cfg, 0).requires_grad_(False)
    distill.add_lora(teacher, 4)
    torch.manual_seed(1)
    for n, p in teacher.named_parameters():
        if ".lora_" in n:
            p.data.normal_(0, 0.1)  # lora_B non-zero, so F differs from T
    assert [n for n, p in teacher.named_parameters() if p.requires_grad] == \
        [n for n, _ in teacher.named_parameters() if ".lora_" in n] and len(distill.lora_init(teacher)) == cfg.num_layers * 10 * 2
    x, t, ctx, _ = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(teacher(x, t, ctx), plain(x, t, ctx))  # outside: the teacher itself
        with distill.fake_score(teacher):
            f = teacher(x, t, ctx)
            with distill.fake_score(teacher, on=False):
                assert torch.equal(teacher(x, t, ctx), plain(x, t, ctx))
            assert torch.equal(teacher(x, t, ctx), f)  # restored on leaving the inner block
        assert not torch.allclose(f, plain(x, t, ctx))

    def lora_grad(ckpt, backward_inside):
        teacher.grad_ckpt = ckpt
        teacher.zero_grad(set_to_none=True)
        with distill.fake_score(teacher):
            loss = teacher(x, t, ctx).square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return torch.cat([p.grad.flatten() for n, p in teacher.named_parameters() if ".lora_" in n])

    ref = lora_grad(False, True)
    assert ref.abs().sum() > 0
    for ckpt, inside in ((True, True), (True, False), (False, False)):
        torch.testing.assert_close(lora_grad(ckpt, inside), ref, rtol=1e-5, atol=1e-7)


def test_phase2_gradients_reach_only_the_generator_and_heads():
    """L_G reaches the generator through x0_hat; the backbone (E) gets no gradient from either loss."""
    import types
    import distill
    cfg = tiny_cfg("i2v")
    gen = random_model(cfg, 0).requires_grad_(True)
    ema = random_model(cfg, 0).requires_grad_(False)
    disc = M.Discriminator(cfg.dim, (0, 1), width=64, n_queries=2)
    m = types.SimpleNamespace(gen=gen, ema=ema, backbone=ema, teacher=ema, disc=disc)
    x, t, ctx, kw = inputs(cfg, B=1)
    batch = {"latent": x[:1], "cond": {"context": F.pad(ctx[:1], (0, 0, 0, cfg.text_len - ctx.shape[1])),
                                        "clip_fea": kw["clip_fea"][:1], "y": kw["y"][:1]},
             "neg": {"context": torch.zeros(1, cfg.text_len, cfg.text_dim)}}
    c = distill.Config(lora_rank=4)
    rng = [torch.Generator().manual_seed(0)]
    distill.phase2_d_step(c, m, batch, rng)
    assert all(p.grad is None for p in gen.parameters()) and all(p.grad is not None for p in disc.parameters())
    distill.phase2_g_step(c, m, batch, rng)
    assert all(p.grad is None for p in ema.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.blocks[0].parameters())

    def g_grad(lambda_adv, head_seed):  # the generator's gradient from one G step with the heads re-drawn
        torch.manual_seed(head_seed)
        m.disc = M.Discriminator(cfg.dim, (0, 1), width=64, n_queries=2)
        gen.zero_grad(set_to_none=True)
        distill.phase2_g_step(replace(c, lambda_adv=lambda_adv), m, batch, [torch.Generator().manual_seed(1)])
        return torch.cat([p.grad.flatten() for p in gen.parameters()])

    assert not torch.equal(g_grad(1.0, 0), g_grad(1.0, 1))  # the heads steer the generator
    assert torch.equal(g_grad(0.0, 0), g_grad(0.0, 1))  # lambda_adv = 0: C-SDS alone
    ref, m.disc = g_grad(0.0, 0), None  # ... and D is not even run (a run without heads would fail)
    gen.zero_grad(set_to_none=True)
    distill.phase2_g_step(replace(c, lambda_adv=0.0), m, batch, [torch.Generator().manual_seed(1)])
    assert torch.equal(torch.cat([p.grad.flatten() for p in gen.parameters()]), ref)


# =============================================================================
# vae.py: tiny VAE (base dim 8), references written op by op from the official VAE's structure


@pytest.fixture(scope="module")
def tiny_vae():
    """A tiny_vae VAE with the official layout; gammas and biases randomised so that none of them is a no-op."""
    torch.manual_seed(0)
    m = WanVAE(dim=8, z_dim=16).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return m


def video(B=1, T=9, H=32, W=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


# -----------------------------------------------------------------------------
# An independent whole-clip reference, written from the official structure and the state dict only.
#
# Which whole-clip pass does the chunked one equal? Every k=3 causal conv keeps the last 2 frames of its
# input stream across chunks, which is exactly ordinary causal padding (2 zero frames in front) over the
# whole stream. The exceptions are the resamples that change time:
#  * down3d: chunk 0 skips the time conv, later chunks prepend the previous last frame and run a stride-2
#    unpadded conv. Over the clip: frame 0 passes through unchanged, then windows (0,1,2), (2,3,4), ...
#    A naive causal pass would instead output conv(0, 0, x0) for frame 0 (same frame count, different value),
#    and that difference spreads to every later latent frame; `naive_down3d=True` builds it to show this.
#  * up3d: latent frame 0 is not doubled and never enters the time conv; frames 1.. go through a causal
#    (zero-padded) time conv of their own: out = [x0, a1, b1, a2, b2, ...].
# With those two rules the chunked encode/decode equal this pass up to float rounding.


MEAN, STD = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (vae.LATENT_MEAN, vae.LATENT_STD))


def conv(sd, name, x, p=1):
    """Causal conv over the whole clip: p spatial pad each side, 2p frames of zeros in front."""
    return F.conv3d(F.pad(x, (p, p, p, p, 2 * p, 0)), sd[name + ".weight"], sd[name + ".bias"])


def rms(x, gamma):
    return x / x.pow(2).mean(1, keepdim=True).sqrt() * gamma


def frames2d(fn, x):
    B, C, T, H, W = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W))
    return y.reshape(B, T, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def ref_res(sd, n, x):
    short = conv(sd, n + ".shortcut", x, 0) if n + ".shortcut.weight" in sd else x
    h = conv(sd, n + ".residual.2", F.silu(rms(x, sd[n + ".residual.0.gamma"])))
    return short + conv(sd, n + ".residual.6", F.silu(rms(h, sd[n + ".residual.3.gamma"])))


def ref_attn(sd, n, x):
    def attend(f):  # (N, C, H, W)
        N, C, H, W = f.shape
        qkv = F.conv2d(rms(f, sd[n + ".norm.gamma"]), sd[n + ".to_qkv.weight"], sd[n + ".to_qkv.bias"])
        q, k, v = qkv.reshape(N, 3, C, H * W).unbind(1)  # (N, C, HW) each
        a = torch.softmax(torch.einsum("nci,ncj->nij", q, k) / C ** 0.5, dim=-1)
        o = torch.einsum("nij,ncj->nci", a, v).reshape(N, C, H, W)
        return F.conv2d(o, sd[n + ".proj.weight"], sd[n + ".proj.bias"])
    return x + frames2d(attend, x)


def ref_down(sd, n, x, time, naive=False):
    w, b = sd[n + ".resample.1.weight"], sd[n + ".resample.1.bias"]
    x = frames2d(lambda f: F.conv2d(F.pad(f, (0, 1, 0, 1)), w, b, stride=2), x)
    if not time:
        return x
    tw, tb = sd[n + ".time_conv.weight"], sd[n + ".time_conv.bias"]
    if naive:
        return F.conv3d(F.pad(x, (0, 0, 0, 0, 2, 0)), tw, tb, stride=(2, 1, 1))
    return torch.cat([x[:, :, :1], F.conv3d(x, tw, tb, stride=(2, 1, 1))], 2)


def ref_up(sd, n, x, time):
    if time:
        C, T = x.shape[1], x.shape[2]
        y = F.conv3d(F.pad(x[:, :, 1:], (0, 0, 0, 0, 2, 0)), sd[n + ".time_conv.weight"], sd[n + ".time_conv.bias"])
        frames = [x[:, :, :1]]
        for t in range(T - 1):  # channels [0:C] -> the earlier frame of the pair, [C:2C] -> the later one
            frames += [y[:, :C, t:t + 1], y[:, C:, t:t + 1]]
        x = torch.cat(frames, 2)
    w, b = sd[n + ".resample.1.weight"], sd[n + ".resample.1.bias"]
    up = lambda f: f.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest at exactly 2x
    return frames2d(lambda f: F.conv2d(up(f), w, b, padding=1), x)


def ref_encode(m, x, naive_down3d=False):
    sd = m.state_dict()
    x = conv(sd, "encoder.conv1", x)
    kinds = ["res", "res", "down2d", "res", "res", "down3d", "res", "res", "down3d", "res", "res"]
    for i, kind in enumerate(kinds):  # the official encoder's block layout
        n = f"encoder.downsamples.{i}"
        x = ref_res(sd, n, x) if kind == "res" else ref_down(sd, n, x, kind == "down3d", naive_down3d)
    x = ref_res(sd, "encoder.middle.2", ref_attn(sd, "encoder.middle.1", ref_res(sd, "encoder.middle.0", x)))
    x = conv(sd, "encoder.head.2", F.silu(rms(x, sd["encoder.head.0.gamma"])))
    mu = conv(sd, "conv1", x, 0)[:, :16]
    return (mu - MEAN) / STD


def ref_decode(m, z):
    sd = m.state_dict()
    z = z * STD + MEAN
    x = conv(sd, "decoder.conv1", conv(sd, "conv2", z, 0))
    x = ref_res(sd, "decoder.middle.2", ref_attn(sd, "decoder.middle.1", ref_res(sd, "decoder.middle.0", x)))
    kinds = ["res"] * 3 + ["up3d"] + ["res"] * 3 + ["up3d"] + ["res"] * 3 + ["up2d"] + ["res"] * 3
    for i, kind in enumerate(kinds):
        n = f"decoder.upsamples.{i}"
        x = ref_res(sd, n, x) if kind == "res" else ref_up(sd, n, x, kind == "up3d")
    x = conv(sd, "decoder.head.2", F.silu(rms(x, sd["decoder.head.0.gamma"])))
    return x.clamp(-1, 1)


# -----------------------------------------------------------------------------
# layout, shapes, causality


def test_official_layout():
    with torch.device("meta"):
        sd = WanVAE().state_dict()
    assert len(sd) == 194 and sum(v.numel() for v in sd.values()) == 126_892_531  # the official Wan2.1_VAE.pth
    expected = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.3.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected


@pytest.mark.parametrize("T", [1, 5, 9])
def test_shapes_batched(tiny_vae, T):
    x = video(B=2, T=T, H=16, W=32)
    with torch.no_grad():
        z = tiny_vae.encode(x)
        y = tiny_vae.decode(z)
        assert z.shape == (2, 16, 1 + (T - 1) // 4, 2, 4) and z.dtype == torch.float32
        assert y.shape == x.shape and y.abs().max() <= 1
        # batching is exact per sample
        torch.testing.assert_close(tiny_vae.encode(x[1:]), z[1:], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise(tiny_vae):
    with pytest.raises(ValueError, match="4n\\+1 frames"):
        tiny_vae.encode(video(T=4))
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_vae.encode(video(T=5, H=12))
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        tiny_vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="B, 16, T, h, w"):
        tiny_vae.decode(torch.zeros(1, 4, 2, 2, 2))


def test_encode_causal(tiny_vae):
    x = video(T=9)
    x2 = x.clone()
    x2[:, :, 5:] = video(T=4, seed=2)
    with torch.no_grad():
        z, z2 = tiny_vae.encode(x), tiny_vae.encode(x2)
    assert torch.equal(z[:, :, :2], z2[:, :, :2])
    assert not torch.allclose(z[:, :, 2], z2[:, :, 2])


def test_decode_causal(tiny_vae):
    torch.manual_seed(3)
    z = torch.randn(1, 16, 3, 4, 4)
    z2 = z.clone()
    z2[:, :, 2] = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        y, y2 = tiny_vae.decode(z), tiny_vae.decode(z2)
    assert torch.equal(y[:, :, :5], y2[:, :, :5])
    assert not torch.allclose(y[:, :, 5:], y2[:, :, 5:])


def test_prefix_equivalence(tiny_vae):
    # Per-chunk causality: a clip's first k chunks give exactly what the shorter clip gives.
    x = video(T=9)
    with torch.no_grad():
        z = tiny_vae.encode(x)
        assert torch.equal(tiny_vae.encode(x[:, :, :5]), z[:, :, :2])
        assert torch.equal(tiny_vae.decode(z[:, :, :2]), tiny_vae.decode(z)[:, :, :5])


# -----------------------------------------------------------------------------
# chunked == whole-clip reference


def test_chunked_encode_matches_whole_clip(tiny_vae):
    x = video(B=2, T=13, H=16, W=16)
    with torch.no_grad():
        z, ref = tiny_vae.encode(x), ref_encode(tiny_vae, x)
        naive = ref_encode(tiny_vae, x, naive_down3d=True)
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-4)
    # the naive pass (time conv on frame 0 too) is a different function, from latent frame 0 on
    assert all((z[:, :, t] - naive[:, :, t]).abs().max() > 1e-3 for t in range(z.shape[2]))


def test_chunked_decode_matches_whole_clip(tiny_vae):
    torch.manual_seed(4)
    z = torch.randn(2, 16, 4, 2, 2)
    with torch.no_grad():
        y, ref = tiny_vae.decode(z), ref_decode(tiny_vae, z)
    assert 0.01 < (y.abs() < 1).float().mean()  # not all clamped, so the comparison means something
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


# -----------------------------------------------------------------------------
# op-by-op re-derivations of the official ops


def test_rms_norm_from_official():
    torch.manual_seed(5)
    n = vae.RMS_norm(6)
    with torch.no_grad():
        n.gamma.uniform_(0.5, 1.5)
        x = torch.randn(2, 6, 3, 4, 5)
        # y = x / sqrt(mean over channels of x^2) * gamma
        expect = x / (x ** 2).sum(1, keepdim=True).div(6).sqrt() * n.gamma.view(1, 6, 1, 1, 1)
        torch.testing.assert_close(n(x), expect)


def test_upsample3d_time_conv_from_official():
    """Chunk 0 is not doubled; chunk 1's time conv sees [0, 0, x1]; chunk 2's sees [0, x1, x2]; frame pair
    of latent frame t = (channels [0:C], channels [C:2C]) of the time conv output."""
    torch.manual_seed(6)
    C = 4
    r = vae.Resample(C, "up3d")
    xs = [torch.randn(1, C, 1, 3, 3) for _ in range(4)]
    cache = {}
    with torch.no_grad():
        got = [r(x, cache) for x in xs]
        w, b = r.time_conv.weight[:, :, :, 0, 0], r.time_conv.bias  # (2C, C, 3)
        cw, cb = r.resample[1].weight, r.resample[1].bias
        spatial = lambda f: F.conv2d(f.repeat_interleave(2, -1).repeat_interleave(2, -2), cw, cb, padding=1)
        assert got[0].shape == (1, C // 2, 1, 6, 6)
        torch.testing.assert_close(got[0][:, :, 0], spatial(xs[0][:, :, 0]))
        stream = [torch.zeros_like(xs[0][:, :, 0])] * 2 + [x[:, :, 0] for x in xs[1:]]  # x0 is not in it
        for t in range(1, 4):
            window = stream[t - 1:t + 2]  # 3 frames ending at x_t
            y = sum(torch.einsum("oc,bchw->bohw", w[:, :, k], window[k]) for k in range(3)) + b.view(1, -1, 1, 1)
            assert got[t].shape == (1, C // 2, 2, 6, 6)
            torch.testing.assert_close(got[t][:, :, 0], spatial(y[:, :C]))  # earlier frame
            torch.testing.assert_close(got[t][:, :, 1], spatial(y[:, C:]))  # later frame


def test_downsample3d_from_official():
    """Chunk 0 (1 frame) skips the time conv; chunk k>0 convolves [last previous frame, 4 new] with stride 2."""
    torch.manual_seed(7)
    C = 4
    r = vae.Resample(C, "down3d")
    x = torch.randn(1, C, 9, 6, 6)
    cache = {}
    with torch.no_grad():
        got = torch.cat([r(x[:, :, :1], cache), r(x[:, :, 1:5], cache), r(x[:, :, 5:9], cache)], 2)
        s = frames2d(lambda f: r.resample[1](F.pad(f, (0, 1, 0, 1))), x)  # (1, C, 9, 3, 3)
        w, b = r.time_conv.weight[:, :, :, 0, 0], r.time_conv.bias
        tc = lambda t: sum(torch.einsum("oc,bchw->bohw", w[:, :, k], s[:, :, t + k]) for k in range(3)) + b.view(1, -1, 1, 1)
        expect = torch.stack([s[:, :, 0], tc(0), tc(2), tc(4), tc(6)], 2)
    torch.testing.assert_close(got, expect)


# -----------------------------------------------------------------------------
# tiling


def test_tiled_decode_whole_tile_is_exact(tiny_vae):
    torch.manual_seed(8)
    z = torch.randn(1, 16, 2, 4, 6)
    with torch.no_grad():
        assert torch.equal(tiny_vae.decode(z, tile=6, overlap=2), tiny_vae.decode(z))


def test_tile_blending_is_exact_for_a_pointwise_decoder(tiny_vae, monkeypatch):
    # With a decoder whose output pixel depends only on its own latent pixel, every tile agrees with the
    # whole-frame decode, so only the blending (weights summing to 1, full coverage) is under test.
    fake = lambda x, progress=None: x[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * 0.1
    monkeypatch.setattr(tiny_vae, "decode_frames", fake)
    torch.manual_seed(9)
    z = torch.randn(2, 16, 1, 11, 13)
    seen = []
    def progress(it):
        seen.append(len(it))
        return it
    with torch.no_grad():
        full = tiny_vae.decode(z)
        for tile, overlap in [(4, 1), (5, 2), (6, 0), (3, 2)]:
            torch.testing.assert_close(tiny_vae.decode(z, tile=tile, overlap=overlap, progress=progress), full)
    assert seen[0] == 4 * 4  # tile 4 / overlap 1 over 11 x 13 latent pixels: origins (0, 3, 6, 7) x (0, 3, 6, 9)


def test_tiled_decode_close_to_whole(tiny_vae):
    # Seams lose conv context and the middle attention sees one tile only, so tiled != whole exactly. With
    # random tiny_vae weights the receptive field spans the whole test frame, so the bound is loose: the error
    # must be well below the gap between unrelated decodes, and shrink as tiles grow.
    torch.manual_seed(10)
    z, other = torch.randn(2, 1, 16, 2, 16, 16).unbind(0)
    with torch.no_grad():
        full = tiny_vae.decode(z)
        unrelated = (full - tiny_vae.decode(other)).abs().mean()
        errs = [(tiny_vae.decode(z, tile=t, overlap=4) - full).abs().mean() for t in (8, 12)]
    assert errs[0] < 0.5 * unrelated and errs[1] < 0.7 * errs[0]


def test_bad_tile_raises(tiny_vae):
    with pytest.raises(ValueError, match="tile must be larger than overlap"):
        tiny_vae.decode(torch.zeros(1, 16, 1, 4, 4), tile=4, overlap=4)


# -----------------------------------------------------------------------------
# loading


def test_from_pretrained_round_trip(tiny_vae, tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(tiny_vae.state_dict(), path)
    m = WanVAE.from_pretrained(str(path))
    assert not any(p.is_meta for p in m.parameters()) and not m.training
    assert m.encoder.conv1.weight.shape[0] == 8 and m.z_dim == 16
    x = video(T=5, H=16, W=16)
    with torch.no_grad():
        assert torch.equal(m.encode(x), tiny_vae.encode(x))
        assert torch.equal(m.decode(tiny_vae.encode(x)), tiny_vae.decode(tiny_vae.encode(x)))
    m16 = WanVAE.from_pretrained(str(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())


def test_from_pretrained_errors(tiny_vae, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth") as e:
        WanVAE.from_pretrained(str(missing))
    assert str(missing) in str(e.value)

    sd = dict(tiny_vae.state_dict())
    del sd["decoder.upsamples.3.time_conv.weight"]
    sd["encoder.extra"] = torch.zeros(1)
    sd["decoder.head.0.gamma"] = torch.ones(5, 1, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        WanVAE.from_pretrained(str(path))
    msg = str(e.value)
    for needle in (str(path), "decoder.upsamples.3.time_conv.weight", "encoder.extra", "decoder.head.0.gamma"):
        assert needle in msg


# =============================================================================
# encoders.py: tiny official-layout umT5 and CLIP files, references re-derived from the official umT5 and CLIP


T5 = dict(vocab=300, dim=32, heads=4, dim_attn=32, ffn=64, layers=2, buckets=32)
CLIP = dict(dim=160, patch=14, grid=2, layers=3, mlp=320)  # head_dim 80 -> 2 heads; 28x28 image -> 1 + 4 tokens
WORDS = [f"w{i}" for i in range(T5["vocab"] - 3)]


# -----------------------------------------------------------------------------
# tiny official-layout files


def t5_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: torch.randn(*s, generator=g) * std
    d, a, f, b, h = T5["dim"], T5["dim_attn"], T5["ffn"], T5["buckets"], T5["heads"]
    sd = {"token_embedding.weight": r(T5["vocab"], d, std=1.0), "norm.weight": 1 + r(d, std=0.1)}
    for i in range(T5["layers"]):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(d, std=0.1), p + "norm2.weight": 1 + r(d, std=0.1),
                   p + "ffn.gate.0.weight": r(f, d), p + "ffn.fc1.weight": r(f, d), p + "ffn.fc2.weight": r(d, f),
                   p + "pos_embedding.embedding.weight": r(b, h, std=1.0)})
        sd.update({p + f"attn.{n}.weight": r(a, d) for n in "qkvo"})
    return sd


def write_tokenizer(folder, post=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    if post:  # as the real umt5 tokenizer.json: TemplateProcessing "$A </s>"
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def t5_files(tmp_path):
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(t5_state(), pth)
    return pth, write_tokenizer(tmp_path / "google" / "umt5-xxl")


@pytest.fixture
def t5(t5_files):
    return T5Encoder.from_pretrained(*t5_files, dtype=torch.float32)


def clip_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.05: torch.randn(*s, generator=g) * std
    d, m = CLIP["dim"], CLIP["mlp"]
    sd = {"visual.patch_embedding.weight": r(d, 3, CLIP["patch"], CLIP["patch"]), "visual.cls_embedding": r(1, 1, d, std=1),
          "visual.pos_embedding": r(1, 1 + CLIP["grid"] ** 2, d, std=1),
          "visual.pre_norm.weight": 1 + r(d), "visual.pre_norm.bias": r(d)}
    for i in range(CLIP["layers"]):
        p = f"visual.transformer.{i}."
        for n in ("norm1", "norm2"):
            sd.update({p + n + ".weight": 1 + r(d), p + n + ".bias": r(d)})
        sd.update({p + "attn.to_qkv.weight": r(3 * d, d), p + "attn.to_qkv.bias": r(3 * d),
                   p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d),
                   p + "mlp.0.weight": r(m, d), p + "mlp.0.bias": r(m), p + "mlp.2.weight": r(d, m), p + "mlp.2.bias": r(d)})
    # present in the official file, not needed by Wan: must be ignored
    sd.update({"visual.post_norm.weight": r(d), "visual.post_norm.bias": r(d), "visual.head": r(d, 64),
               "log_scale": torch.tensor(2.6), "textual.token_embedding.weight": r(50, 48),
               "textual.blocks.0.attn.q.weight": r(48, 48), "textual.head.0.weight": r(56, 48)})
    return sd


@pytest.fixture
def clip_pth(tmp_path):
    pth = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(clip_state(), pth)
    return pth


# -----------------------------------------------------------------------------
# T5: references written from the official umT5 encoder


def ref_bucket(rel):
    """Hand-derived: exact below 8; then bucket 8 + k starts at ceil(8 * 16^(k/8)) = 12, 16, 23, 32, 46, 64, 91."""
    r = abs(rel)
    b = r if r < 8 else 8 + sum(r >= t for t in (12, 16, 23, 32, 46, 64, 91))
    return b + (16 if rel > 0 else 0)


def test_rel_bucket_table():
    hand = {0: 0, 1: 17, -1: 1, 7: 23, -7: 7, 8: 24, -8: 8, 11: 24, 12: 25, 15: 25, 16: 26, -16: 10, 22: 26, 23: 27,
            31: 27, 32: 28, -32: 12, 45: 28, 46: 29, 63: 29, 64: 30, -64: 14, 90: 30, 91: 31, 127: 31, -127: 15,
            128: 31, -128: 15, 200: 31, -200: 15}
    rel = torch.arange(-200, 201)
    got = rel_bucket(rel).tolist()
    assert got == [ref_bucket(x) for x in range(-200, 201)]
    assert {k: got[k + 200] for k in hand} == hand


def ref_rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def ref_t5_block(sd, i, x, mask):
    p, (B, L, _), H = f"blocks.{i}.", x.shape, T5["heads"]
    W = lambda n: sd[p + n + ".weight"]
    h = ref_rms(x, W("norm1"))
    q, k, v = (torch.einsum("bld,ed->ble", h, W(f"attn.{n}")).reshape(B, L, H, -1) for n in "qkv")
    table = W("pos_embedding.embedding")
    bias = torch.tensor([[[table[ref_bucket(j - i_), hh] for j in range(L)] for i_ in range(L)] for hh in range(H)])
    logits = torch.einsum("bihc,bjhc->bhij", q, k) + bias  # no 1/sqrt(d)
    logits = logits.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    o = torch.einsum("bhij,bjhc->bihc", e / e.sum(-1, keepdim=True), v).reshape(B, L, -1)
    x = x + o @ W("attn.o").T
    h = ref_rms(x, W("norm2"))
    return x + ref_ffn(sd, i, h)


def ref_ffn(sd, i, h):
    W = lambda n: sd[f"blocks.{i}.ffn.{n}.weight"]
    g = h @ W("gate.0").T
    return (h @ W("fc1").T * F.gelu(g, approximate="tanh")) @ W("fc2").T


def test_t5_layer_and_forward_match_official(t5):
    sd = t5_state()
    torch.manual_seed(0)
    ids = torch.randint(3, T5["vocab"], (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    x = sd["token_embedding.weight"][ids]
    ref = ref_t5_block(sd, 0, x, mask)
    L = ids.shape[1]
    pos = torch.arange(L)
    got = t5.blocks[0](x, rel_bucket(pos[None] - pos[:, None]), (mask != 0).view(2, 1, 1, L))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    h = torch.randn(2, 5, T5["dim"])
    torch.testing.assert_close(t5.blocks[1].ffn(h), ref_ffn(sd, 1, h), atol=1e-5, rtol=1e-5)
    for i in range(T5["layers"]):
        x = ref_t5_block(sd, i, x, mask)
    torch.testing.assert_close(t5(ids, mask), ref_rms(x, sd["norm.weight"]), atol=1e-5, rtol=1e-5)


def test_t5_padding_is_masked(t5):
    torch.manual_seed(1)
    ids = torch.randint(3, T5["vocab"], (1, 6))
    alone = t5(ids, torch.ones_like(ids))  # no padding at all
    padded = torch.cat([ids, torch.randint(0, T5["vocab"], (1, 10))], 1)  # junk in the padding
    mask = torch.tensor([[1] * 6 + [0] * 10])
    torch.testing.assert_close(t5(padded, mask)[:, :6], alone, atol=1e-5, rtol=1e-5)


def test_clean_text():
    assert clean_text("  w1 &amp;amp; \t\n w2  ") == "w1 & w2"
    assert clean_text("w1&lt;w2\u3000 w3") == "w1<w2 w3"


def test_tokenize_eos_truncation_and_post_processor(t5, t5_files, tmp_path):
    ids, mask = t5.tokenize(["w5 w6 w7", "", " ".join(WORDS[:10] * 60)])
    assert ids.shape == mask.shape == (3, 512)
    assert ids[0, :4].tolist() == [8, 9, 10, 1] and mask[0].sum() == 4 and ids[0, 4:].eq(0).all()
    assert ids[1, :1].tolist() == [1] and mask[1].sum() == 1
    assert mask[2].all() and ids[2, -1] == 1 and ids[2, -2] == WORDS.index(WORDS[:10][510 % 10]) + 3
    # a tokenizer.json without the "$A </s>" post-processor gives the same ids (EOS neither missing nor doubled)
    other = T5Encoder.from_pretrained(t5_files[0], write_tokenizer(tmp_path / "nopost", post=False), dtype=torch.float32)
    for a, b in zip(t5.tokenize(["w5 w6 w7", "w1"]), other.tokenize(["w5 w6 w7", "w1"])):
        assert torch.equal(a, b)


def test_encode_lengths_and_batch_equals_single(t5):
    prompts = ["w1 w2 w3", "w4", " w5   w6\tw7 w8 w9 w10 w11 "]
    out = t5.encode(prompts)
    assert [o.shape for o in out] == [(4, 32), (2, 32), (8, 32)]  # real tokens + EOS
    for p, o in zip(prompts, out):
        torch.testing.assert_close(t5.encode([p])[0], o, atol=1e-5, rtol=1e-5)


def test_t5_bf16_default(t5, t5_files):
    m = T5Encoder.from_pretrained(*t5_files)
    assert m.token_embedding.weight.dtype == torch.bfloat16
    o = m.encode("w1 w2 w3 w4")[0]  # a single string is one prompt
    assert o.dtype == torch.bfloat16 and o.shape == (5, 32)
    torch.testing.assert_close(o.float(), t5.encode(["w1 w2 w3 w4"])[0], atol=0.15, rtol=0.05)


def test_t5_errors(t5_files, tmp_path):
    pth, tok = t5_files
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        T5Encoder.from_pretrained(tmp_path / "nope.pth", tok)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T5Encoder.from_pretrained(pth, tmp_path)
    sd = t5_state()
    del sd["blocks.1.ffn.fc2.weight"]
    sd["blocks.0.norm2.weight"] = torch.ones(31)
    sd["blocks.0.extra.weight"] = torch.ones(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        T5Encoder.from_pretrained(tmp_path / "bad.pth", tok)
    msg = str(e.value)
    assert "missing blocks.1.ffn.fc2.weight" in msg and "blocks.0.norm2.weight is (31,), expected (32,)" in msg
    assert "unexpected blocks.0.extra.weight" in msg and "\n" not in msg
    del sd["token_embedding.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="token_embedding.weight"):
        T5Encoder.from_pretrained(tmp_path / "bad.pth", tok)


# -----------------------------------------------------------------------------
# CLIP: references written from the official CLIP vision tower and its I2V preprocessing


def ref_ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * w + b


def ref_clip_block(sd, i, x):
    p, (B, L, D) = f"visual.transformer.{i}.", x.shape
    H = D // 80
    lin = lambda n, h: h @ sd[p + n + ".weight"].T + sd[p + n + ".bias"]
    qkv = lin("attn.to_qkv", ref_ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])).reshape(B, L, 3, H, 80)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, H, 80) each
    a = torch.softmax(torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(80), -1)
    x = x + lin("attn.proj", torch.einsum("bhij,bjhc->bihc", a, v).reshape(B, L, D))
    h = lin("mlp.0", ref_ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"]))
    return x + lin("mlp.2", 0.5 * h * (1 + torch.erf(h / math.sqrt(2))))  # exact GELU


def ref_clip(sd, pixels):
    B, P, g = len(pixels), CLIP["patch"], CLIP["grid"]
    patches = pixels.reshape(B, 3, g, P, g, P).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)  # raster order
    x = patches @ sd["visual.patch_embedding.weight"].reshape(CLIP["dim"], -1).T
    x = torch.cat([sd["visual.cls_embedding"].expand(B, -1, -1), x], 1) + sd["visual.pos_embedding"]
    x = ref_ln(x, sd["visual.pre_norm.weight"], sd["visual.pre_norm.bias"])
    for i in range(CLIP["layers"] - 1):  # all but the last block
        x = ref_clip_block(sd, i, x)
    return x


def ref_preprocess(img):
    x = F.interpolate(img, size=(28, 28), mode="bicubic", align_corners=False) * 0.5 + 0.5
    return (x - torch.tensor(encoders.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(encoders.CLIP_STD).view(1, 3, 1, 1)


def test_clip_matches_official(clip_pth):
    m = CLIPVision.from_pretrained(clip_pth)
    assert m.image_size == 28 and len(m.transformer) == CLIP["layers"] - 1 and m.transformer[0].attn.heads == 2
    sd = clip_state()
    torch.manual_seed(0)
    x = torch.randn(2, 5, CLIP["dim"])
    torch.testing.assert_close(m.transformer[1](x), ref_clip_block(sd, 1, x), atol=1e-5, rtol=1e-5)
    pixels = torch.randn(2, 3, 28, 28)
    out = m(pixels)
    assert out.shape == (2, 5, CLIP["dim"])
    torch.testing.assert_close(out, ref_clip(sd, pixels), atol=1e-5, rtol=1e-5)


def test_clip_preprocessing(clip_pth):
    m = CLIPVision.from_pretrained(clip_pth)
    torch.manual_seed(0)
    img = torch.rand(1, 3, 40, 70) * 2 - 1  # not square: squashed, not cropped
    torch.testing.assert_close(m.encode_image(img), m(ref_preprocess(img)), atol=1e-5, rtol=1e-5)
    same = torch.rand(2, 3, 28, 28) * 2 - 1  # at the native size bicubic is the identity: only the normalisation
    mean, std = torch.tensor(encoders.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(encoders.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(m.encode_image(same), m(((same + 1) / 2 - mean) / std), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        m.encode_image(torch.zeros(3, 28, 28))


def test_clip_fp16(clip_pth):
    m16, m32 = CLIPVision.from_pretrained(clip_pth, dtype=torch.float16), CLIPVision.from_pretrained(clip_pth)
    img = torch.rand(1, 3, 30, 33) * 2 - 1
    out = m16.encode_image(img)
    assert out.dtype == torch.float16 and m16.pre_norm.weight.dtype == torch.float16
    torch.testing.assert_close(out.float(), m32.encode_image(img), atol=0.02, rtol=0.01)


def test_clip_errors(clip_pth, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        CLIPVision.from_pretrained(tmp_path / "nope.pth")
    sd = clip_state()
    del sd["visual.transformer.1.mlp.2.bias"]
    sd["visual.pre_norm.weight"] = torch.ones(7)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        CLIPVision.from_pretrained(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing visual.transformer.1.mlp.2.bias" in msg and "visual.pre_norm.weight is (7,), expected (160,)" in msg
    assert "textual" not in msg and "post_norm" not in msg


def test_official_sizes_on_meta():
    with torch.device("meta"):
        t5 = T5Encoder(256384, 4096, 4096, 10240, 64, 24, 32)
        clip = CLIPVision(1280, 14, 16, 31, 5120)
        out = clip(torch.empty(1, 3, 224, 224))
    sd = t5.state_dict()
    assert len(sd) == 242 and sum(v.numel() for v in sd.values()) == 5_680_910_336  # the official umT5-XXL encoder file
    assert sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)
    assert clip.image_size == 224 and clip.transformer[30].attn.heads == 16 and out.shape == (1, 257, 1280)
    assert clip.state_dict()["transformer.0.attn.to_qkv.weight"].shape == (3840, 1280)


# =============================================================================
# sample.py and data.py: a complete tiny official-layout checkpoint directory


T5_DIM, CLIP_DIM = 32, 160


# -----------------------------------------------------------------------------
# a tiny checkpoint directory in the official layout (also used by the distillation tests and the demo)


def _tokenizer(folder, words):
    """A word-level umT5 stand-in: the given words, each non-ASCII character (so the Chinese negative prompt
    tokenizes), <unk> otherwise; </s> appended by the post-processor, as the real tokenizer.json does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    chars = sorted(set(sample.I2V_NEG_PREFIX + sample.NEG_PROMPT))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in list(words) + chars:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"[^\x00-\x7f]"), "isolated")])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return len(vocab)


def _randomise(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or "norm" in name:
                p.uniform_(0.5, 1.5, generator=gen)
            else:
                p.normal_(0, 0.5 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1, generator=gen)


def make_tiny_checkpoint(path, model_type="i2v", seed=0):
    """Write a complete tiny Wan2.1 checkpoint directory (random weights) for `model_type` t2v or i2v: config.json,
    diffusion_pytorch_model.safetensors (dim 64, 2 layers), Wan2.1_VAE.pth (base dim 8), the umT5 .pth (dim 32)
    with google/umt5-xxl/tokenizer.json, and for i2v the CLIP .pth (width 160, 28-pixel input, 1 + 4 tokens)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    # DiT: every weight random, the head included (the official init zeroes it, which would hide bugs)
    cfg = WanConfig(model_type, in_dim=16 if model_type == "t2v" else 36, dim=64, ffn_dim=96, num_heads=4,
                    num_layers=2, text_dim=T5_DIM, clip_dim=CLIP_DIM)
    dit = WanModel(cfg)
    _randomise(dit, g)
    keys = ["model_type", "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim",
            "text_len", "text_dim", "clip_dim"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", "_diffusers_version": "0.30.0", **{k: getattr(cfg, k) for k in keys}}, f)
    sd = {k: v.contiguous() for k, v in dit.state_dict().items()}
    save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    vae = WanVAE(dim=8)
    _randomise(vae, g)
    torch.save(vae.state_dict(), os.path.join(path, sample.VAE_FILE))
    # umT5: vocabulary of the synthetic captions and the test prompts
    words = ["a", "moving", "the", "cat", "walks", *data.SHAPES, *data.COLOURS, *data.DIRECTIONS]
    vocab = _tokenizer(os.path.join(path, sample.TOKENIZER_DIR), words)
    r = lambda *s, std=0.2: torch.randn(*s, generator=g) * std  # noqa: E731
    d, f, heads = T5_DIM, 64, 4
    t5 = {"token_embedding.weight": r(vocab, d, std=1.0), "norm.weight": 1 + r(d, std=0.1)}
    for i in range(2):
        p = f"blocks.{i}."
        t5.update({p + "norm1.weight": 1 + r(d, std=0.1), p + "norm2.weight": 1 + r(d, std=0.1),
                   p + "ffn.gate.0.weight": r(f, d), p + "ffn.fc1.weight": r(f, d), p + "ffn.fc2.weight": r(d, f),
                   p + "pos_embedding.embedding.weight": r(32, heads, std=1.0),
                   **{p + f"attn.{n}.weight": r(d, d) for n in "qkvo"}})
    torch.save(t5, os.path.join(path, sample.T5_FILE))
    if model_type == "i2v":  # ViT: width 160 (2 heads of 80), patch 14, 2x2 grid; the file's last block is unused
        d, m = CLIP_DIM, 2 * CLIP_DIM
        sd = {"visual.patch_embedding.weight": r(d, 3, 14, 14, std=0.05), "visual.cls_embedding": r(1, 1, d, std=1),
              "visual.pos_embedding": r(1, 5, d, std=1), "visual.pre_norm.weight": 1 + r(d, std=0.05),
              "visual.pre_norm.bias": r(d, std=0.05)}
        for i in range(3):
            p = f"visual.transformer.{i}."
            sd.update({p + "norm1.weight": 1 + r(d, std=0.05), p + "norm1.bias": r(d, std=0.05),
                       p + "norm2.weight": 1 + r(d, std=0.05), p + "norm2.bias": r(d, std=0.05),
                       p + "attn.to_qkv.weight": r(3 * d, d, std=0.05), p + "attn.to_qkv.bias": r(3 * d, std=0.05),
                       p + "attn.proj.weight": r(d, d, std=0.05), p + "attn.proj.bias": r(d, std=0.05),
                       p + "mlp.0.weight": r(m, d, std=0.05), p + "mlp.0.bias": r(m, std=0.05),
                       p + "mlp.2.weight": r(d, m, std=0.05), p + "mlp.2.bias": r(d, std=0.05)})
        torch.save(sd, os.path.join(path, sample.CLIP_FILE))
    return path


@pytest.fixture(scope="module")
def i2v_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("i2v"), "i2v")


@pytest.fixture(scope="module")
def t2v_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("t2v"), "t2v")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("img") / "x.png")
    imageio.imwrite(path, np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return path


def read_mp4(path):
    return np.stack(imageio.mimread(path, memtest=False))  # (F, H, W, 3)


# -----------------------------------------------------------------------------
# the I2V condition and the size rule


def test_target_size_official_rule():
    # by hand: 720x1280 at 832*480: sqrt(399360 * 0.5625) = 473.96 -> //8 = 59 -> //2*2 = 58 -> 464;
    # sqrt(399360 / 0.5625) = 842.6 -> 105 -> 104 -> 832
    assert sample.target_size(720, 1280, 832 * 480) == (464, 832)
    assert sample.target_size(1280, 720, 832 * 480) == (832, 464)
    # an exact 832x480 image comes out 464 high: 399360 * (480/832) = 230399.99999999997 in float64, whose root
    # is just under 480 (official computes it the same way, with np.sqrt)
    assert sample.target_size(480, 832, 832 * 480) == (464, 832)
    assert sample.target_size(720, 1280, 1280 * 720) == (720, 1280)
    assert sample.target_size(40, 56, 32 * 32) == (16, 32)  # sqrt(1024 * 40/56) = 27.0 -> 3 -> 2 -> 16; 37.9 -> 4 -> 32


def test_i2v_condition_mask_and_layout(i2v_ckpt):
    vae = WanVAE.from_pretrained(os.path.join(i2v_ckpt, sample.VAE_FILE))
    img = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = sample.i2v_condition(vae, img, 9, 16, 32)
    assert y.shape == (20, 3, 2, 4) and y.dtype == torch.float32
    assert torch.equal(y[:4, 0], torch.ones(4, 2, 4)) and torch.equal(y[:4, 1:], torch.zeros(4, 2, 2, 4))
    resized = F.interpolate(img[None], size=(16, 32), mode="bicubic", align_corners=False)
    video = torch.cat([resized[:, :, None], torch.zeros(1, 3, 8, 16, 32)], 2)
    with torch.no_grad():
        torch.testing.assert_close(y[4:], vae.encode(video)[0])
    assert y[4:, 1:].abs().sum() > 0  # the zero frames went through the VAE


# -----------------------------------------------------------------------------
# sample.py end to end


def test_i2v_end_to_end(i2v_ckpt, image, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "i2v.mp4")
    sample.main(["--ckpt_dir", i2v_ckpt, "--image", image, "--prompt", "a red circle moving left",
                 "--frames", "9", "--size", "32*32", "--out", out])
    v = read_mp4(out)
    assert v.shape == (9, 16, 32, 3)  # (h, w) = target_size(40, 56, 32*32)
    assert v.std() > 0
    assert imageio.get_reader(out).get_meta_data()["fps"] == 16
    # no --ckpt_dir: the bundled demo model when it exists, else a clear error (tested in test_user_errors)
    monkeypatch.setattr(sample, "DEFAULT_CKPT", i2v_ckpt)
    sample.main(["--image", image, "--frames", "5", "--size", "32*32", "--offload", "--out",
                 str(tmp_path / "demo.mp4")])
    assert "using the bundled demo model" in capsys.readouterr().out
    assert read_mp4(str(tmp_path / "demo.mp4")).shape == (5, 16, 32, 3)


def test_t2v_end_to_end_and_samplers(t2v_ckpt, tmp_path):
    out = str(tmp_path / "t2v.mp4")
    sample.main(["--ckpt_dir", t2v_ckpt, "--prompt", "the cat walks", "--frames", "5", "--size", "48*32", "--out", out])
    assert read_mp4(out).shape == (5, 32, 48, 3)
    sample.main(["--ckpt_dir", t2v_ckpt, "--prompt", "the cat walks", "--frames", "5", "--size", "32*16",
                 "--steps", "4", "--out", str(tmp_path / "four.mp4")])
    sample.main(["--ckpt_dir", t2v_ckpt, "--prompt", "the cat walks", "--frames", "5", "--size", "32*16",
                 "--teacher", "--steps", "2", "--out", str(tmp_path / "teacher.mp4")])
    assert read_mp4(str(tmp_path / "teacher.mp4")).shape == (5, 16, 32, 3)


def test_81_frames_progress_and_stage_times(i2v_ckpt, tmp_path, capsys):
    img = str(tmp_path / "sq.png")
    imageio.imwrite(img, np.full((30, 30, 3), 200, dtype=np.uint8))
    out = str(tmp_path / "long.mp4")
    sample.main(["--ckpt_dir", i2v_ckpt, "--image", img, "--size", "32*32", "--out", out, "--tile", "9"])
    text = capsys.readouterr().out
    assert read_mp4(out).shape == (81, 32, 32, 3)
    for needle in ("VAE enc", "VAE dec", "DiT", "21/21", "1/1", "time: load", "text", "image", "VAE ", "total"):
        assert needle in text, needle


def test_student_weights(i2v_ckpt, image, tmp_path):
    dit = WanModel.from_pretrained(i2v_ckpt)
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    sd["head.head.bias"] += 1.0  # a different DiT: its video must differ
    student = str(tmp_path / "student.safetensors")
    save_file(sd, student)
    args = ["--ckpt_dir", i2v_ckpt, "--image", image, "--frames", "5", "--size", "32*32"]
    sample.main(args + ["--out", str(tmp_path / "teacher_w.mp4")])
    sample.main(args + ["--student", student, "--out", str(tmp_path / "student.mp4")])
    assert not np.array_equal(read_mp4(str(tmp_path / "teacher_w.mp4")), read_mp4(str(tmp_path / "student.mp4")))
    del sd["blocks.0.ffn.0.bias"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SystemExit, match="bad.safetensors does not match the official layout.*blocks.0.ffn.0.bias"):
        sample.main(args + ["--student", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "no.mp4")])


def test_user_errors(i2v_ckpt, t2v_ckpt, image, tmp_path, monkeypatch):
    def err(argv):
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        msg = str(e.value.code)
        assert msg.startswith("sample.py: error: ") and "\n" not in msg
        return msg

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(i2v_ckpt):
        if f != sample.CLIP_FILE:
            os.symlink(os.path.join(i2v_ckpt, f), broken / f)
    out = ["--out", str(tmp_path / "o.mp4")]
    assert sample.CLIP_FILE in err(["--ckpt_dir", str(broken), "--image", image] + out)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert "cannot read the image" in err(["--ckpt_dir", i2v_ckpt, "--image", str(bad)] + out)
    assert "4n+1" in err(["--ckpt_dir", i2v_ckpt, "--image", image, "--frames", "8"] + out)
    assert "multiples of 16" in err(["--ckpt_dir", t2v_ckpt, "--prompt", "a", "--size", "40*32"] + out)
    assert "t2v checkpoint" in err(["--ckpt_dir", t2v_ckpt, "--prompt", "a", "--image", image] + out)
    assert "--image" in err(["--ckpt_dir", i2v_ckpt] + out)
    (tmp_path / "o.mp4").write_bytes(b"mine")
    assert "already exists" in err(["--ckpt_dir", i2v_ckpt, "--image", image] + out)
    assert (tmp_path / "o.mp4").read_bytes() == b"mine"
    monkeypatch.setattr(sample, "DEFAULT_CKPT", str(tmp_path / "no_demo"))
    assert "--ckpt_dir" in err(["--image", image])


# -----------------------------------------------------------------------------
# data.py


def test_synthetic_clip_moves():
    clip = data.synthetic_clip("circle", "red", "left", 9, 32, 48, np.random.default_rng(0))
    assert clip.shape == (9, 32, 48, 3) and clip.dtype == np.uint8
    red = (clip == np.array(data.COLOURS["red"], dtype=np.uint8)).all(-1)  # (F, H, W)
    xs = [np.nonzero(m)[1].mean() for m in red]
    ys = [np.nonzero(m)[0].mean() for m in red]
    assert all(b < a for a, b in zip(xs, xs[1:])) and np.ptp(ys) < 1.0
    steps = np.diff(xs)
    assert np.allclose(steps, steps.mean(), atol=0.6)  # constant speed, up to pixel rounding
    assert data.caption("circle", "red", "left") == "a red circle moving left"


def test_read_frames_resamples_to_16fps(tmp_path):
    levels = np.arange(12, dtype=np.uint8) * 20  # frame i is a flat grey of level 20 i
    clip = np.broadcast_to(levels[:, None, None, None], (12, 16, 16, 3)).copy()
    imageio.mimwrite(str(tmp_path / "a.gif"), clip, duration=125)  # 8 fps: each frame is shown twice at 16 fps
    got = data.read_frames(str(tmp_path / "a.gif"), 5)
    assert got.shape == (5, 16, 16, 3) and got[:, 0, 0, 0].tolist() == [0, 0, 20, 20, 40]
    w = imageio.get_writer(str(tmp_path / "b.mp4"), fps=32, codec="libx264", quality=10, macro_block_size=16)
    for f in clip:
        w.append_data(f)
    w.close()
    got = data.read_frames(str(tmp_path / "b.mp4"), 5)[:, 8, 8, 0].astype(int)  # 32 fps: every other frame
    assert np.abs(got - [0, 40, 80, 120, 160]).max() <= 3
    with pytest.raises(data.Skip, match="too_short"):
        data.read_frames(str(tmp_path / "b.mp4"), 9)
    x = data.resize_crop(np.zeros((2, 30, 60, 3), np.uint8), 32, 16)  # cover: 30x60 -> 16x32, no crop needed
    assert x.shape == (3, 2, 16, 32) and x.min() == -1


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("videos"))
    data.main(["--synthetic", "4", "--out", root, "--frames", "17", "--size", "64*48"])
    with open(os.path.join(root, "x.mp4"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(2000))  # corrupt
    sample.save_mp4(np.zeros((5, 48, 64, 3), np.uint8), os.path.join(root, "short.mp4"))  # 5 < 9 frames
    with open(os.path.join(root, "captions.jsonl"), "a") as f:
        f.write(json.dumps({"file": "x.mp4", "caption": "a red square"}) + "\n")
        f.write(json.dumps({"file": "short.mp4", "caption": "a blue square"}) + "\n")
    return root


def test_synthetic_folder(videos):
    with open(os.path.join(videos, "captions.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 6
    v = read_mp4(os.path.join(videos, lines[0]["file"]))
    assert v.shape == (17, 48, 64, 3)
    assert lines[0]["caption"].split()[1] in data.COLOURS and lines[0]["caption"].split()[2] in data.SHAPES
    with pytest.raises(SystemExit, match="not empty"):
        data.main(["--synthetic", "1", "--out", videos])


@pytest.fixture(scope="module")
def latents(i2v_ckpt, videos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents") / "lat")
    data.precompute(i2v_ckpt, videos, out, frames=9, size="32*32")
    return out


def test_precompute(latents, videos, i2v_ckpt, capsys):
    with open(os.path.join(latents, "manifest.json")) as f:
        man = json.load(f)
    assert (man["model_type"], man["frames"], man["size"]) == ("i2v", 9, "32*32")
    assert len(man["clips"]) == 4 and {c["shard"] for c in man["clips"]} == {"shard_00000.safetensors"}
    assert man["skipped"] == {"unreadable": ["x.mp4"], "too_short": ["short.mp4"]}
    assert data.is_precomputed(latents) and not data.is_precomputed(videos)
    data.precompute(i2v_ckpt, videos, latents, frames=9, size="32*32")  # resumable: nothing left to do
    assert "0 clips to encode" in capsys.readouterr().out
    with pytest.raises(ValueError, match="another --out"):
        data.precompute(i2v_ckpt, videos, latents, frames=5, size="32*32")
    assert not [f for f in os.listdir(latents) if f.endswith(".tmp")]


def test_precompute_t2v(t2v_ckpt, videos, tmp_path):
    out = data.main(["--ckpt_dir", t2v_ckpt, "--videos", videos, "--out", str(tmp_path / "t2v"), "--frames", "5",
                     "--size", "16*16"])
    ds = data.LatentDataset(out)
    assert ds.model_type == "t2v" and len(ds) == 5 and set(ds[3]) == {"latent", "context"}  # short.mp4 has 5 frames
    assert ds[3]["latent"].shape == (16, 2, 2, 2)
    os.remove(os.path.join(out, "neg_context.safetensors"))
    with pytest.raises(FileNotFoundError, match="neg_context"):
        data.LatentDataset(out)
    data.precompute(t2v_ckpt, videos, out, frames=5, size="16*16")  # nothing to encode, but the missing file is redone
    assert data.LatentDataset(out).neg_context.shape[1] == T5_DIM


def test_dataset_and_collate(latents, i2v_ckpt):
    ds = data.LatentDataset(latents)
    assert len(ds) == 4 and ds.model_type == "i2v"
    assert ds.neg_context.dim() == 2 and ds.neg_context.shape[1] == T5_DIM and ds.neg_context.dtype == torch.float32
    it = ds[0]
    assert it["latent"].shape == (16, 3, 4, 4) and it["y"].shape == (20, 3, 4, 4) and it["clip"].shape == (5, CLIP_DIM)
    assert it["context"].shape[1] == T5_DIM and all(v.dtype == torch.float32 for v in it.values())
    assert torch.equal(it["y"][:4, 0], torch.ones(4, 4, 4)) and not it["y"][:4, 1:].any()
    b = data.collate([ds[i] for i in range(4)])
    L = max(ds[i]["context"].shape[0] for i in range(4))
    assert b["latent"].shape == (4, 16, 3, 4, 4) and b["context"].shape == (4, L, T5_DIM)
    short = min(range(4), key=lambda i: ds[i]["context"].shape[0])
    n = ds[short]["context"].shape[0]
    assert torch.equal(b["context"][short, :n], ds[short]["context"]) and not b["context"][short, n:].any()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        data.LatentDataset(os.path.dirname(latents))


class Ids(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"latent": torch.tensor([i]), "context": torch.zeros(1 + i % 3, 2)}


def ids(batch):
    return batch["latent"][:, 0].tolist()


def test_clip_stream_is_the_same_on_any_topology():
    """distill's clip stream: each epoch visits every clip once in a new order, batches run across epochs, and a global
    batch's micro-batches, dealt to the data-parallel ranks, are the same clips in the same slots for any dp or
    micro_batch; each clip's generators depend on its position and the step kind only."""
    import distill
    cfg = distill.Config(seed=3, batch_size=4, micro_batch=1)
    stream = [ids(b) for first in range(0, 24, 4) for b, _ in distill.micro_batches(cfg, Ids(), first, 0, 1)]
    flat = sum(stream, [])
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10)) and flat[:10] != flat[10:20]
    for dp, mb in ((2, 1), (4, 1), (2, 2), (1, 4)):
        c = replace(cfg, micro_batch=mb)
        for first in (0, 8, 16):
            got = {}
            for r in range(dp):
                for b, pos in distill.micro_batches(c, Ids(), first, r, dp):
                    got.update(zip(pos, ids(b)))
            assert [got[q] for q in range(first, first + 4)] == flat[first:first + 4], (dp, mb, first)
    draw = lambda pos, role: torch.stack([torch.rand(3, generator=g) for g in distill.clip_rngs(cfg, pos, role, "cpu")])  # noqa: E731
    assert torch.equal(draw(range(4, 6), 1)[1], draw(range(5, 7), 1)[0]) and not torch.equal(draw([5], 1), draw([5], 2))
    assert distill.stream_position(replace(cfg, phase1_steps=3, disc_steps=2), 5) == 4 * (3 + 2 * 2)


def test_help(capsys):
    for mod in (sample, data):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0 and "--out" in capsys.readouterr().out


# =============================================================================
# distill.py end to end: torchrun on gloo, resume, non-finite steps


DISTILL = ["--lora_rank=4", "--disc_width=64", "--log_every=1", "--export_dtype=fp32", "--batch_size=2"]


def distill_cmd(args, nproc=1):
    return [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
                               if nproc > 1 else []) + [os.path.join(HERE, "distill.py")] + DISTILL + args


def run_distill(args, nproc=1):
    return subprocess.run(distill_cmd(args, nproc), capture_output=True, text=True, cwd=HERE, timeout=600)


def start_distill(args, out, nproc=1):
    """distill.py (under torchrun when nproc > 1) in the background, returned once it has logged its first step."""
    p = subprocess.Popen(distill_cmd(args + [f"--out={out}"], nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd=HERE)
    log = os.path.join(out, "log.jsonl")
    for _ in range(1500):
        if os.path.exists(log) and os.path.getsize(log):
            break
        time.sleep(0.2)
    return p


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_distill_two_processes_both_phases(i2v_ckpt, latents, tmp_path):
    """2 ranks, FSDP2 over both and Ulysses sp=2: Phase I then Phase II, a checkpoint, the exported student; the
    generator's gradient clipped (its norm is about 5) on sharded gradients."""
    out = str(tmp_path / "run")
    r = run_distill([f"--teacher={i2v_ckpt}", f"--data={latents}", f"--out={out}", "--phase1_steps=2",
                     "--phase2_steps=2", "--sp=2", f"--val_data={latents}", "--val_every=1", "--grad_clip=1"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = read_log(out)
    assert [x["phase"] for x in log] == [1, 1, 2, 2]
    assert all(math.isfinite(v) for x in log for v in x.values())
    assert all(k in log[-1] for k in ("loss_d", "loss_r1", "loss_g_adv", "loss_csds", "d_real", "d_fake", "gnorm_gen",
                                      "gx_adv", "gx_csds"))
    assert all(0 <= log[-1][f"val_acc@{s}"] <= 1 for s in (0.25, 0.5, 0.75)) and "val_acc@0.5" not in log[1]
    assert log[-1]["gnorm_gen"] > 1  # so it was clipped
    assert all(k in log[0] for k in ("loss_dmd", "loss_fake", "tokens_per_s", "peak_mem_gib", "step_s"))
    student = WanModel.from_pretrained(os.path.join(out, "student.safetensors"))
    teacher = WanModel.from_pretrained(i2v_ckpt)
    diff = [(a - b).abs().max() for a, b in zip(student.parameters(), teacher.parameters())]
    assert max(diff) > 0  # the EMA moved
    assert os.path.isdir(os.path.join(out, "ckpt_00000004")) and not any(p.endswith(".tmp") for p in os.listdir(out))
    r = run_distill([f"--teacher={i2v_ckpt}", f"--data={latents}", f"--out={out}"])
    assert r.returncode != 0 and "student.safetensors exists" in r.stdout + r.stderr


def test_distill_resume_equals_uninterrupted(i2v_ckpt, latents, tmp_path):
    """Stopped after step 1 and after step 3 (across the phase change), then resumed: bitwise the same student."""
    args = [f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=2", "--phase2_steps=2", "--keep_ckpts=1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_distill(args + [f"--out={a}"]).returncode == 0
    for extra in (["--stop_after=1"], ["--stop_after=2"], []):
        r = run_distill(args + [f"--out={b}"] + extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and sorted(os.listdir(b)) == ["ckpt_00000004", "config.json", "log.jsonl",
                                                                    "student.safetensors"]
    with open(os.path.join(a, "student.safetensors"), "rb") as fa, open(os.path.join(b, "student.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()


def test_dmd2_peer_trains_heads_on_the_fake_score_and_resumes_bitwise(i2v_ckpt, latents, tmp_path):
    """The DMD2 peer (toy.py PEERS): DMD from pure noise with a GAN on the fake score's features and 2 fake-score
    updates per generator step, Phase I alone. The heads train in Phase I, and a run stopped after step 1 resumes to
    the same student, bit for bit (the heads' state is saved and restored in Phase I too)."""
    args = [f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=2", "--phase2_steps=0", "--sigma_g_min=1",
            "--gan_weight=0.03", "--k_fake=2", "--keep_ckpts=1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_distill(args + [f"--out={a}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = read_log(a)
    assert all(x["phase"] == 1 and x["loss_cls"] > 0 and x["loss_gan_g"] > 0 and x["gnorm_disc"] > 0 for x in log)
    for extra in (["--stop_after=1"], []):
        r = run_distill(args + [f"--out={b}"] + extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(a, "student.safetensors"), "rb") as fa, open(os.path.join(b, "student.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()


def test_student_steps_trains_g_at_the_n_step_samplers_sigmas(i2v_ckpt, latents, tmp_path):
    """--student_steps=4: Phase II's generator inputs are sample_student's 4 sigmas, each drawn; 1 keeps pure noise
    and leaves the run as it was (same student bit for bit as without the flag); 4 trains another student, and
    --backward_sim another again (it runs under the real loop, also in bf16 with 4-step previews); --backward_sim
    without N > 1 is a one-line error."""
    import distill
    cfg = distill.Config(student_steps=4, shift=3.0)
    rng = [torch.Generator().manual_seed(i) for i in range(64)]
    s = distill.student_sigma(cfg, 64, rng, "cpu")
    assert sorted(set(s.tolist())) == pytest.approx([sample.shift_sigma(1 - k / 4, 3.0) for k in (3, 2, 1, 0)])
    assert torch.equal(distill.student_sigma(replace(cfg, student_steps=1), 64, rng, "cpu"), torch.ones(64))
    args = [f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=0", "--phase2_steps=2"]
    files = []
    for extra in ([], ["--student_steps=1"], ["--student_steps=4"], ["--student_steps=4", "--backward_sim=1"],
                  ["--student_steps=4", "--backward_sim=1", "--param_dtype=bf16", "--preview_every=2"]):
        out = str(tmp_path / f"run{len(files)}")
        r = run_distill(args + extra + [f"--out={out}"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        files.append(open(os.path.join(out, "student.safetensors"), "rb").read())
    assert files[0] == files[1] != files[2] != files[3]
    assert read_mp4(os.path.join(out, "previews", "00000002_0.mp4")).std() > 0  # a 4-step preview, in bf16
    for bad in ("--student_steps=0", "--backward_sim=1"):
        r = run_distill(args + [bad, f"--out={tmp_path / 'bad'}"])
        assert r.returncode == 1 and bad.split("=")[0] in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_backward_sim_trains_g_on_its_own_sampler_states():
    """--backward_sim: G's input at the sampler's step k is what sample_student feeds it there (its own guesses,
    re-noised), not the real clip noised: the sample does not move with the clip and, at the last step, is
    sample_student's output from the same noise. Without it, the sample moves with the clip."""
    import distill
    cfg = tiny_cfg("t2v")
    gen = random_model(cfg)
    x0, _, ctx, _ = inputs(cfg, B=1)
    import types
    m, cond = types.SimpleNamespace(gen=gen), {"context": ctx}
    c = distill.Config(student_steps=3, shift=3.0, backward_sim=True)
    seed = next(i for i in range(100) if distill.student_sigma(c, 1, [torch.Generator().manual_seed(i)], "cpu") < 0.7)
    draw = lambda c, x: distill.student_sample(c, m, x, cond, [torch.Generator().manual_seed(seed)])  # noqa: E731
    with torch.no_grad():
        assert torch.equal(draw(c, x0), draw(c, x0 + 1))
        assert not torch.equal(draw(replace(c, backward_sim=False), x0), draw(replace(c, backward_sim=False), x0 + 1))
        g = torch.Generator().manual_seed(seed)
        torch.rand(1, generator=g)  # student_sigma's draw
        ref = sample.sample_student(lambda x, t, context: gen(x, t, context), torch.randn(x0.shape, generator=g),
                                    cond, 3, 3.0, g)
    torch.testing.assert_close(draw(c, x0).detach(), ref, rtol=1e-5, atol=1e-5)


def test_student_generate_is_sample_students_sampler():
    """distill.student_generate, the previews' sampler, is sample.py's sample_student: the same clip from the same
    noise and generator, in 1 step and in 3."""
    import distill
    cfg = tiny_cfg("t2v")
    gen = random_model(cfg)
    x0, _, ctx, _ = inputs(cfg, B=1)
    for n in (1, 3):
        g, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        with torch.no_grad():
            got = distill.student_generate(distill.Config(student_steps=n, shift=3.0), gen,
                                           torch.randn(x0.shape, generator=g), {"context": ctx}, [g])
            ref = sample.sample_student(lambda x, t, context: gen(x, t, context), torch.randn(x0.shape, generator=g_ref),
                                        {"context": ctx}, n, 3.0, g_ref)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_distill_resumes_from_a_checkpoint_written_while_training(i2v_ckpt, latents, tmp_path):
    """Checkpoints written by dcp.async_save while the next steps run (every step here, 2 gloo ranks): one from the
    middle of the run, copied into a new --out, resumes to the same student, bit for bit."""
    import shutil
    args = [f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=2", "--phase2_steps=2", "--ckpt_every=1",
            "--keep_ckpts=10"]
    r = run_distill(args + [f"--out={tmp_path / 'a'}"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [d for d in sorted(os.listdir(tmp_path / "a")) if d.startswith("ckpt_")] == [
        f"ckpt_{s:08d}" for s in (1, 2, 3, 4)]  # --keep_ckpts=10: none pruned, also at the end
    assert run_distill(args + [f"--out={tmp_path / 'c'}", "--stop_after=3"], nproc=2).returncode == 0
    shutil.copytree(tmp_path / "c" / "ckpt_00000002", tmp_path / "d" / "ckpt_00000002")  # written during step 3
    r = run_distill(args + [f"--out={tmp_path / 'd'}"], nproc=2)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "a" / "student.safetensors").read_bytes() == (tmp_path / "d" / "student.safetensors").read_bytes()


def test_distill_phase1_checkpoint_starts_other_heads(i2v_ckpt, latents, tmp_path):
    """A checkpoint from before Phase II carries no trained heads: a run with other heads resumes from it."""
    args = [f"--teacher={i2v_ckpt}", f"--data={latents}", f"--out={tmp_path}", "--phase1_steps=1", "--phase2_steps=1"]
    assert run_distill(args + ["--stop_after=1"]).returncode == 0
    r = run_distill(args + ["--disc_width=128", "--disc_taps=1", "--disc_queries=2"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert [x["phase"] for x in read_log(tmp_path)] == [1, 2]


def test_distill_in_process_twice_leaves_the_environment_alone(i2v_ckpt, latents, tmp_path, capsys):
    """distill.main can be called again in one process (toy.py does), and writes nothing into os.environ."""
    import distill
    env = dict(os.environ)
    for name in ("a", "b"):
        distill.main(DISTILL + [f"--teacher={i2v_ckpt}", f"--data={latents}", f"--out={tmp_path / name}",
                                "--phase1_steps=1", "--phase2_steps=1"])
    assert dict(os.environ) == env and not dist.is_initialized()
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [x["phase"] for x in b] == [1, 2] and [x["loss_dmd"] for x in a[:1]] == [x["loss_dmd"] for x in b[:1]]


def test_disc_shift_follows_the_resolution():
    import distill
    c = distill.Config(disc_shift=5.0, disc_shift_ref=32760)
    x = lambda f, h, w: torch.zeros(1, 16, f, h, w)  # noqa: E731
    assert distill.disc_shift(c, x(21, 60, 104)) == pytest.approx(5.0)  # 480p x 81 frames: 32,760 tokens
    assert distill.disc_shift(c, x(21, 90, 160)) == pytest.approx(5 * math.sqrt(75600 / 32760))  # 720p
    assert distill.disc_shift(replace(c, disc_shift_ref=0), x(5, 16, 16)) == 5.0


def test_distill_stops_on_non_finite_steps(i2v_ckpt, latents, tmp_path):
    r = run_distill([f"--teacher={i2v_ckpt}", f"--data={latents}", f"--out={tmp_path / 'nan'}", "--phase1_steps=3",
                     "--phase2_steps=0", "--lr_phase1=1e30", "--max_bad_steps=1", "--ckpt_every=1000"])
    assert r.returncode == 1 and "step skipped" in r.stdout and "too many non-finite losses" in r.stdout


@pytest.fixture(scope="module")
def t2v_latents(t2v_ckpt, videos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents") / "t2v")
    data.precompute(t2v_ckpt, videos, out, frames=9, size="32*32")
    return out


@pytest.mark.parametrize("kind,sp", [("i2v", 2), ("t2v", 1)])
def test_distill_bf16_both_phases_close_to_fp32(kind, sp, i2v_ckpt, latents, t2v_ckpt, t2v_latents, tmp_path):
    """The GPU's dtypes on 2 gloo ranks: --param_dtype=bf16 runs both phases (it crashed at the first D step when the
    heads were fed fp32) and logs the fp32 run's losses within 3%: bf16 keeps 8 bits, a relative rounding of 0.4% per
    op, and the logged losses pass through two tiny blocks. STR1's loss_r1 is left out: it divides a difference of two
    D outputs by the perturbation's size, and at this size that difference is at bf16's resolution of the backbone."""
    ckpt, lat = (i2v_ckpt, latents) if kind == "i2v" else (t2v_ckpt, t2v_latents)
    logs = {}
    for dt in ("fp32", "bf16"):
        out = str(tmp_path / dt)
        r = run_distill([f"--teacher={ckpt}", f"--data={lat}", f"--out={out}", "--phase1_steps=2", "--phase2_steps=2",
                         f"--sp={sp}", f"--param_dtype={dt}"], nproc=2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        logs[dt] = read_log(out)
    assert [x["phase"] for x in logs["bf16"]] == [1, 1, 2, 2]
    keys = ["loss_dmd", "loss_fake", "gnorm_gen", "gnorm_fake", "loss_d", "loss_g_adv", "loss_csds", "d_real", "d_fake",
            "gnorm_disc", "gx_adv", "gx_csds"]
    pairs = [(a[k], b[k]) for a, b in zip(logs["fp32"], logs["bf16"]) for k in keys if k in a]
    assert len(pairs) == 2 * 4 + 2 * 9 and all(math.isfinite(b) for _, b in pairs)
    assert all(b == pytest.approx(a, rel=0.03, abs=2e-3) for a, b in pairs), pairs
    assert any(a != b for a, b in pairs)  # bf16 really ran


def test_sharded_dit_fills_each_rank_from_the_file(i2v_ckpt):
    """distill.sharded_dit on 2 gloo ranks: built on meta and filled rank by rank, each model holds the checkpoint's
    weights (uneven and empty shards included), the bf16 teacher in bf16 with its LoRA in fp32 and trainable."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(HERE, "test_vpae.py"), "shard", i2v_ckpt]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300)
    assert out.returncode == 0 and out.stdout.count("SHARD OK") == 2, out.stdout + out.stderr


def shard_worker(ckpt):
    import distill
    cfg = distill.parse_args([f"--teacher={ckpt}", "--lora_rank=4"])
    device, *_ = distill.setup_dist(cfg, *distill.launch_env())
    state = dict(M.WanModel.from_pretrained(ckpt).named_parameters())
    for dt in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = distill.sharded_dit(cfg, device, None, distill.fsdp_mesh(cfg, device), dt, lora_rank=4)
        for name, p in model.named_parameters():
            full = p.full_tensor()
            if ".lora_" in name:
                assert p.dtype == torch.float32 and p.requires_grad, name
                assert (full == 0).all() if name.endswith("B.weight") else full.std() > 0, name
            else:
                assert p.dtype == dt and not p.requires_grad and torch.equal(full, state[name].to(dt)), name
        assert model.blocks[0].modulation.to_local().shape[0] == 1 - dist.get_rank()  # (1, 6, D): rank 1 holds none
        x = [model.blocks[0].self_attn.q.lora_A.weight.full_tensor()]
        dist.broadcast(x[0], 0)
        assert torch.equal(x[0], model.blocks[0].self_attn.q.lora_A.weight.full_tensor())  # alike on every rank
    print("SHARD OK")
    dist.destroy_process_group()


def test_slow_ranks_wait_on_the_wait_group(videos, i2v_ckpt, tmp_path):
    """Collectives time out after --timeout_min (6 s here), yet rank 1 precomputing 8 s longer than rank 0 and rank 0
    writing the student for 8 s do not stop the run: the others wait on the gloo wait group. With a wait group of
    under 8 s (--wait_hours=0.001) the same run fails, so the short timeout is real."""
    ckpt = tmp_path / "ckpt"  # the tiny checkpoint with a demo entry: distill precomputes 9 frames at 32*32
    ckpt.mkdir()
    for f in os.listdir(i2v_ckpt):
        os.symlink(os.path.join(i2v_ckpt, f), ckpt / f) if f != "config.json" else None
    with open(os.path.join(i2v_ckpt, "config.json")) as f:
        (ckpt / "config.json").write_text(json.dumps({**json.load(f), "vpae_demo": {"frames": 9, "size": "32*32"}}))
    args = [f"--teacher={ckpt}", f"--data={videos}", "--phase1_steps=1", "--phase2_steps=1", "--timeout_min=0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(HERE, "test_vpae.py"), "slow"] + DISTILL + args
    ok = subprocess.run(cmd + [f"--out={tmp_path / 'a'}"], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert ok.returncode == 0 and os.path.isfile(tmp_path / "a" / "student.safetensors"), ok.stdout + ok.stderr[-3000:]
    bad = subprocess.run(cmd + [f"--out={tmp_path / 'b'}", "--wait_hours=0.001"], capture_output=True, text=True,
                         cwd=HERE, timeout=300)
    assert bad.returncode != 0 and "imed out" in bad.stdout + bad.stderr, bad.stdout + bad.stderr[-3000:]


def slow_worker(argv):
    """distill.main with rank 1 slow on its first clip and rank 0 slow to write the student (8 s each)."""
    import safetensors.torch
    import distill

    def slow(fn, rank):
        def wrapped(*a, **k):
            if int(os.environ["RANK"]) == rank and not wrapped.done:
                wrapped.done = True
                time.sleep(8)
            return fn(*a, **k)
        wrapped.done = False
        return wrapped
    data.read_frames = slow(data.read_frames, 1)
    safetensors.torch.save_file = slow(safetensors.torch.save_file, 0)
    distill.main(argv)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_distill_signal_saves_then_exits_and_the_log_has_no_repeats(sig, i2v_ckpt, latents, tmp_path):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) alike: the step finishes, a checkpoint is saved, one line, exit 0. The
    run resumed from it rewrites log.jsonl without the lines of the steps it redoes."""
    import signal
    out = str(tmp_path / "term")
    args = [f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=1000", "--ckpt_every=1000"]
    p = start_distill(args, out)
    p.send_signal(getattr(signal, sig))
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "checkpoint saved" in text and "Traceback" not in text, text[-3000:]
    assert f"no checkpoint in {out}: starting at step 0" in text
    ckpts = [d for d in os.listdir(out) if d.startswith("ckpt_")]
    assert len(ckpts) == 1 and not ckpts[0].endswith(".tmp") and int(ckpts[0][5:]) < 1000
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # as if the run had logged a step after its checkpoint
        f.write(json.dumps({"step": int(ckpts[0][5:]) + 1, "phase": 1}) + "\n")
    r = run_distill(args + [f"--out={out}", "--stop_after=2"])
    steps = [x["step"] for x in read_log(out)]
    assert r.returncode == 0 and steps == sorted(set(steps)) and steps[-1] == int(ckpts[0][5:]) + 2, steps


def test_distill_previews_and_export_from_a_checkpoint(i2v_ckpt, latents, tmp_path):
    """--preview_every writes the EMA's one-step clips of fixed conditions (2 gloo ranks, sharded); --export_from turns
    a checkpoint into a student without training, the same file from 1 process and from 2."""
    out = tmp_path / "run"
    r = run_distill([f"--teacher={i2v_ckpt}", f"--data={latents}", f"--out={out}", "--phase1_steps=1",
                     "--phase2_steps=1", "--preview_every=1", "--stop_after=1"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(out / "previews")) == ["00000001_0.mp4", "00000001_1.mp4"]
    v = read_mp4(out / "previews" / "00000001_0.mp4")
    assert v.shape == (9, 32, 32, 3) and v.std() > 0
    student = out / "student_00000001.safetensors"
    files = []
    for n in (1, 2):
        r = run_distill([f"--export_from={out / 'ckpt_00000001'}"], nproc=n)
        assert r.returncode == 0 and "exported the EMA generator" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
        files.append(student.read_bytes())
        r = run_distill([f"--export_from={out / 'ckpt_00000001'}"]) if n == 1 else r
        assert n == 2 or (r.returncode != 0 and "exists: delete it to export again" in r.stdout + r.stderr)
        student.unlink()
    assert files[0] == files[1]
    import distill  # twice in one process, as toy.py exports checkpoints: the process group is released each time
    for _ in range(2):
        distill.main([f"--export_from={out / 'ckpt_00000001'}", "--export_dtype=fp32"])
        assert student.read_bytes() == files[0]
        student.unlink()
    r = run_distill([f"--export_from={out}"])
    assert r.returncode != 0 and "is not a complete checkpoint folder" in r.stdout + r.stderr


def test_distill_hsdp_equals_fsdp(i2v_ckpt, latents, tmp_path):
    """--shard_ranks=2 on 4 gloo ranks (HSDP: 2 replicas of 2 shards) trains as plain FSDP over the 4 ranks does, up to
    the order of the gradient sums (as in the resume test)."""
    base = [f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=1", "--phase2_steps=1", "--batch_size=4"]
    for name, extra in (("fsdp", []), ("hsdp", ["--shard_ranks=2"])):
        r = run_distill(base + [f"--out={tmp_path / name}", *extra], nproc=4)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = read_log(tmp_path / "fsdp"), read_log(tmp_path / "hsdp")
    for x, y in zip(a, b):
        for k in x:
            if k.startswith(("loss", "gnorm", "d_", "gx")):
                assert y[k] == pytest.approx(x[k], rel=1e-6, abs=5e-5), (k, x[k], y[k])
    s, t = (WanModel.from_pretrained(tmp_path / n / "student.safetensors") for n in ("fsdp", "hsdp"))
    assert max(float((p - q).abs().max()) for p, q in zip(s.parameters(), t.parameters())) < 1e-6
    r = run_distill(base + [f"--out={tmp_path / 'bad'}", "--shard_ranks=3"], nproc=4)
    assert r.returncode != 0 and "--shard_ranks=3 must divide the world size 4" in r.stdout + r.stderr


def test_distill_resume_on_other_world_sizes_and_sp(i2v_ckpt, latents, tmp_path):
    """A 2-rank run stopped and resumed on 4 ranks, then on 1, and another resumed from 2 ranks at sp 1 onto 2 ranks
    at sp 2, against the uninterrupted 2-rank run. The data order and every clip's noise are the same whatever the
    topology, so every logged figure (D's held-out accuracy included, its clips split over the data-parallel groups)
    is equal to its 6 decimals (measured) but one: the sums over ranks and
    micro-batches come in another order, and the heads' Adam (beta1 0) turns a gradient element's rounding into a
    step of up to lr_disc at the first steps, so D's outputs after a resume on 1 rank move by 1e-5 (measured 1.1e-5 in
    loss_g_adv); the students differ by 7e-9 (measured). Fields that must not change are refused; others printed."""
    base = [f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=2", "--phase2_steps=2", "--batch_size=4",
            "--keep_ckpts=1", f"--val_data={latents}", "--val_clips=3", "--val_every=1"]  # 3: a spare forward on 2 or 4
    run = lambda out, n, *extra: run_distill(base + [f"--out={tmp_path / out}", *extra], nproc=n)  # noqa: E731
    assert run("a", 2).returncode == 0
    for n, extra in ((2, ["--stop_after=1"]), (4, ["--stop_after=1"]), (1, [])):
        r = run("b", n, *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for n, extra in ((2, ["--stop_after=2"]), (2, ["--sp=2", "--lr_phase2=2e-6"])):
        r = run("c", n, *extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "with --lr_phase2=2e-06 (was 2e-06)" not in r.stdout and "--sp=2 (was 1)" in r.stdout
    a, b, c = (read_log(tmp_path / x) for x in "abc")
    assert [x["step"] for x in b] == [x["step"] for x in c] == [1, 2, 3, 4]
    keys = [k for k in a[0] if k.startswith(("loss", "gnorm"))] + [k for k in a[-1] if k.startswith(("loss", "d_"))]
    keys += [k for k in a[-1] if k.startswith("val_acc")]  # split over 2, 4, 1 and 1 data-parallel groups
    for run_log in (b, c):
        for x, y in zip(a, run_log):
            for k in keys:
                if k in x:  # rounding only: a different order of the clips or of their noise moves these by percents
                    assert y[k] == pytest.approx(x[k], rel=1e-6, abs=5e-5), (k, x["step"], x[k], y[k])
    students = [WanModel.from_pretrained(tmp_path / x / "student.safetensors") for x in "abc"]
    for s in students[1:]:
        diff = max(float((p - q).abs().max()) for p, q in zip(students[0].parameters(), s.parameters()))
        assert diff < 1e-6, diff
    assert run("d", 1, "--stop_after=1").returncode == 0
    r = run("d", 1, "--seed=1", "--batch_size=2")
    assert r.returncode != 0 and "--seed=0 (now 1), --batch_size=4 (now 2)" in r.stdout + r.stderr, r.stdout[-2000:]


# -----------------------------------------------------------------------------
# toy.py: the metrics on hand-made clips, the quick benchmark, the bundled demo


def shape_clip(direction="right", colour="red", shape="square", seed=0):
    return data.synthetic_clip(shape, colour, direction, 17, 64, 64, np.random.default_rng(seed))


@pytest.mark.parametrize("direction", list(data.DIRECTIONS))
def test_toy_motion_detects_the_direction(direction):
    import toy
    v = shape_clip(direction)
    assert toy.motion_correct(v, "red", direction)
    assert not any(toy.motion_correct(v, "red", d) for d in data.DIRECTIONS if d != direction)
    assert not toy.motion_correct(v, "blue", direction)  # no blue shape: nothing to track
    assert not toy.motion_correct(np.repeat(v[:1], 17, 0), "red", direction)  # a still shape does not move


def test_toy_speed_metric():
    """Displacement along the caption is the travel the clip was drawn with; real futures are in range and at W1 0;
    a still, a too fast, a backwards and an untracked clip are out of range, and W1 grows with the error."""
    import toy
    combos = [("square", "red", "right"), ("circle", "blue", "up"), ("triangle", "white", "left")]
    grid, caps = toy.make_clips(combos, seed=5, speeds=4, grid=toy.SPEED_GRID)  # (3, 34, F, H, W, 3)
    real = np.array([[toy.displacement(v, c.split()[1], c.split()[4])[0] for v in g] for g, c in zip(grid, caps)])
    travel = 0.5 * (64 - 2 * 0.15 * 64)  # data.synthetic_clip: half the room, crossed in m frames; 17 are kept
    expect = travel * 16 / (np.array(toy.SPEED_GRID) - 1)
    assert np.abs(real - expect).max() < 1.0  # the centroid tracks the drawn motion to a pixel
    assert toy.speed_metrics(real[:, 5], real) == {"in_range": 1.0, "w1": pytest.approx(
        np.mean(np.abs(np.sort(np.repeat(real[:, 5], 34)) - np.sort(real.ravel())))), "slow": 0.0,
        "ratio": pytest.approx(real[:, 5].mean() / real.mean())}
    assert toy.speed_metrics(real[:, 0], real)["in_range"] == 1.0 and toy.speed_metrics(real[:, -1], real)["in_range"] == 1.0
    cases = (np.zeros(3), real[:, 0] + 3, -real[:, 5], np.full(3, np.nan))  # still, too fast, backwards, lost
    for bad, slow in zip(cases, (1, 0, 1, 1)):
        assert toy.speed_metrics(bad, real)["in_range"] == 0.0 and toy.speed_metrics(bad, real)["slow"] == slow
    w = [toy.speed_metrics(real[:, 10] * f, real)["w1"] for f in (1.0, 0.5, 0.0)]
    assert w[0] < w[1] < w[2] and toy.speed_metrics(np.full(3, np.nan), real)["w1"] == w[2]  # untracked counts as still


def test_toy_orderings_use_the_training_seed_spread():
    import toy
    row = lambda fd: {"nfe": 1, **{k: [[v] * 2 for v in fd] for k in toy.METRICS}}  # noqa: E731
    r = {"V-PAE student, 1 step": row([10.0, 11.0, 12.0]), "ablation: lambda_adv = 0 (C-SDS alone), 1 step": row([13.0, 14.0, 15.0])}
    assert toy.better(r, "V-PAE student, 1 step", "ablation: lambda_adv = 0 (C-SDS alone), 1 step", "fd")  # 3 > 2 x 1
    r["ablation: lambda_adv = 0 (C-SDS alone), 1 step"] = row([11.0, 12.5, 14.0])
    assert not toy.better(r, "V-PAE student, 1 step", "ablation: lambda_adv = 0 (C-SDS alone), 1 step", "fd")
    std_ok = lambda fd: [ok for s, ok in toy.checks({"V-PAE student, 1 step": row(fd)}) if "FD std" in s]  # noqa: E731
    assert std_ok([10.0, 11.0, 12.0]) == [True] and std_ok([10.0, 12.0, 14.0]) == [False]  # sd 1 and 2 against 1.1, 1.2


def test_toy_sweep_checks_the_few_step_student_against_its_one_step():
    """--sweep's few-step rule: a run's 4-step student passes when every metric's mean is at least its 1-step's."""
    import toy
    row = lambda v, fd: {"nfe": 1, **{k: [[v]] for k in toy.METRICS}, "fd": [[fd]]}  # noqa: E731
    r = {"full, 1 step": row(1.0, 10.0), "full, 4 steps": row(1.0, 9.0), "sweep_a, 1 step": row(1.0, 10.0),
         "sweep_a, 4 steps": row(1.0, 11.0)}
    few = {s.split(",")[0]: (ok, s) for s, ok in toy.checks(r) if "4 steps" in s}
    assert few["full"][0] and not few["sweep_a"][0] and "(worse: fd)" in few["sweep_a"][1]


def test_toy_psnr_and_consistency():
    import toy
    v = shape_clip()
    assert toy.psnr(v[0], v[0]) == float("inf")
    noisy = np.clip(v[0].astype(int) + np.random.default_rng(0).integers(-3, 4, v[0].shape), 0, 255).astype(np.uint8)
    assert 35 < toy.psnr(v[0], noisy) < 60 and toy.psnr(v[0], v[-1]) < toy.psnr(v[0], noisy)
    area = toy.colour_mask(v[:1], "red").sum()
    assert toy.consistency(v, "red", area) == 1.0
    recoloured, red = v.copy(), toy.colour_mask(v, "red")
    recoloured[8:][red[8:]] = data.COLOURS["blue"]  # the shape turns blue from frame 8 on
    assert toy.consistency(recoloured, "red", area) == pytest.approx(8 / 17)
    assert toy.consistency(v, "red", 2 * area) == 0.0  # the wrong size everywhere


def test_toy_frechet_distance():
    import toy
    a = np.random.default_rng(0).standard_normal((200, 16))
    assert abs(toy.frechet(a, a)) < 1e-8
    assert [toy.frechet(a, a + s) for s in (0.1, 0.5, 1.0)] == pytest.approx([16 * s * s for s in (0.1, 0.5, 1.0)],
                                                                              rel=1e-6)  # a shift adds |shift|^2
    assert toy.frechet(a, 2 * a) > 1.0  # and so does a change of spread
    feats = np.stack([toy.clip_feature(shape_clip(d, seed=i)) for i in range(6) for d in data.DIRECTIONS])
    assert feats.shape == (24, 16) and abs(toy.frechet(feats, feats)) < 1e-8


def test_toy_speeds_share_the_condition():
    import toy
    v, caps = toy.make_clips([("circle", "green", "left")], seed=3, speeds=3)
    assert v.shape == (1, 3, toy.FRAMES, toy.SIZE, toy.SIZE, 3) and caps == ["a green circle moving left"]
    assert (v[0, 1:, 0] == v[0, :1, 0]).all()  # one first frame
    assert len({v[0, k, -1].tobytes() for k in range(3)}) > 1  # several futures


def test_toy_inflated_vae_works_frame_by_frame():
    import toy
    torch.manual_seed(0)
    v = WanVAE(dim=4).eval()
    toy.inflate(v)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        z = v.encode(x)
        for k in (1, 2):  # latent frame k holds pixel frame 4k, as if it were a clip's first frame
            torch.testing.assert_close(z[:, :, k], v.encode(x[:, :, 4 * k:4 * k + 1])[:, :, 0], atol=1e-5, rtol=1e-5)
        y = v.decode(z)
        for k in (1, 2):  # and decodes to four copies of one frame
            assert (y[:, :, 4 * k - 3:4 * k + 1] - y[:, :, 4 * k:4 * k + 1]).abs().max() < 1e-5


def test_toy_quick_benchmark(tmp_path, capsys):
    # about 2 minutes on 2 CPU cores: 120 distillation steps of the bundled teacher, then the evaluation;
    # toy.main exits non-zero when the one-step student does not beat the one-step teacher on FD
    import toy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = toy.main(["--quick", "--out", str(tmp_path / "quick")])
    assert not [w for w in caught if "single process" in str(w.message)]  # dcp's, once in the middle of the table
    assert f"wrote {tmp_path / 'quick' / 'results'}.md and .json" in capsys.readouterr().out
    assert np.mean(results["V-PAE student, 1 step"]["fd"]) < np.mean(results["teacher, 1 step, no CFG"]["fd"])
    assert os.path.isfile(tmp_path / "quick" / "results.md") and os.path.isfile(tmp_path / "quick" / "strip.png")
    health = json.loads((tmp_path / "quick" / "results.json").read_text())["disc_health"]["full_s0"]
    assert 0 <= health["caption_acc"] <= 1  # disc_caption found the run's last checkpoint and scored its D
    # the C-SDS pull diagnostic: at sigma' 0 the target is the student's own clip, whatever w
    table = toy.csds_pull(toy.sample.DEFAULT_CKPT, os.path.join(toy.sample.DEFAULT_CKPT, "student.safetensors"),
                          str(tmp_path / "quick" / "val_latents"), toy.eval_combos(16, seed=2), toy.VAL_SEED, print,
                          sigmas=(0.0, 0.9), ws=(3.0, 7.5))
    rows = [r.split(" | ", 1)[1] for r in table.splitlines()[2:]]
    assert len(rows) == 5 and rows[0] == rows[1] == rows[2] and rows[3] != rows[4] != rows[0]


def test_demo_assets_small_and_in_official_layout():
    demo = sample.DEFAULT_CKPT
    for f in ("config.json", "diffusion_pytorch_model.safetensors", sample.VAE_FILE, sample.T5_FILE, sample.CLIP_FILE,
              os.path.join(sample.TOKENIZER_DIR, "tokenizer.json"), "student.safetensors"):
        assert os.path.isfile(os.path.join(demo, f)), f
    assets = os.path.join(HERE, "assets")
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(assets) for f in fs) <= 20 * 2**20
    WanModel.from_pretrained(demo)  # both DiTs load strictly
    WanModel.from_pretrained(demo, weights=os.path.join(demo, "student.safetensors"))


def test_demo_sample_out_of_the_box(tmp_path):
    # the README's command, in a fresh process: no flag but the image; the demo's student, prompt, size, frames
    import toy
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--image", os.path.join(HERE, "assets",
                        "example.png")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 60
    assert "using the bundled demo model" in r.stdout and "--ckpt_dir" in r.stdout and "student 1 step" in r.stdout
    v = read_mp4(str(tmp_path / "example_a_red_circle_moving_right_student1_seed0.mp4"))
    assert v.shape == (toy.FRAMES, toy.SIZE, toy.SIZE, 3)
    assert toy.motion_correct(v, "red", "right")  # the student does what the demo's prompt says


def test_demo_lora_of_a_student_reproduces_it(tmp_path):
    """The README's LoRA path on the demo: the bundled student exported as a full-rank LoRA, then sample.py --lora
    with no --student. It is merged onto the teacher and gives the student's video (it used to go onto the bundled
    student: 4.2 levels away at full rank, measured; 0.0 now); the base and the LoRA are printed, and the default
    name says which LoRA."""
    demo, run = os.path.join(HERE, "assets", "demo"), tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(demo, "student.safetensors"), run / "student.safetensors")
    r = run_distill(["--export_lora=128", f"--teacher={demo}", f"--out={run}", "--export_dtype=fp32"])  # full rank
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cmd = [sys.executable, os.path.join(HERE, "sample.py"), "--image", os.path.join(HERE, "assets", "example.png")]
    for extra in ([], ["--lora", str(run / "student_lora_rank128.safetensors")]):
        r = subprocess.run(cmd + extra, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    assert f"DiT weights: {demo} (the teacher) + LoRA {run / 'student_lora_rank128.safetensors'} x 1" in r.stdout
    a, b = (read_mp4(str(tmp_path / f"example_a_red_circle_moving_right_student1{x}_seed0.mp4"))
            for x in ("", "_student_lora_rank128"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.2


# =============================================================================
# vpae_kernels/: every Triton op against its _ref, on CPU under the interpreter (in a fresh process, see
# test_triton_interpreter_run) or compiled on a GPU; bf16 attention only on a GPU (the interpreter's bf16 dot is broken)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU")


def _triton_matches_device():
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    import vpae_kernels as kernels
    if not kernels.HAVE_TRITON:
        return False
    interpreted = isinstance(tl.zeros, InterpretedFunction)
    return interpreted == kernels._attention.INTERPRET == (DEV == "cpu")


@pytest.fixture
def K(monkeypatch):
    """The kernels package with the Triton path forced (`MODE` is put back after the test)."""
    import vpae_kernels as kernels
    if not _triton_matches_device():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; test_in_fresh_process runs these")
    monkeypatch.setattr(kernels, "MODE", "triton")
    return kernels


def test_triton_interpreter_run():
    """Without a GPU, the kernel tests need TRITON_INTERPRET=1 before triton is first imported: run them in a
    fresh process (setting it here would also route every other CPU test through the slow interpreter)."""
    if _triton_matches_device():
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_kernel_",
                        os.path.abspath(__file__)], cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def _grads(out, inputs, seed=0):
    g = torch.Generator(device=out.device).manual_seed(seed)
    dy = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dy), dy


def _check(got, want, tol):
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _randn(*shape, gen, dtype=torch.float32, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(*shape, generator=gen)).to(DEV, dtype).requires_grad_()


def _compare_attention(K, dtype, D, Lq, Lk, k_lens, tol, B=2, H=2):
    g = torch.Generator().manual_seed(0)
    q, k, v = (_randn(B, L, H, D, gen=g, dtype=dtype) for L in (Lq, Lk, Lk))
    k_lens = torch.tensor(k_lens, device=DEV) if k_lens is not None else None
    o = K.attention(q, k, v, k_lens)
    assert o.dtype == dtype and o.shape == q.shape
    grads, do = _grads(o, (q, k, v))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]  # the reference in fp64 on the same inputs
    o_ref = K.attention_ref(*ref, k_lens)
    _check((o, *grads), (o_ref, *torch.autograd.grad(o_ref, ref, do.double())), tol)
    return o, grads


@pytest.mark.parametrize("dtype,D,Lq,Lk,k_lens", [
    (torch.float32, 64, 77, 77, None),
    (torch.float32, 128, 130, 33, [33, 5]),  # cross-attention shape, and a sample with k_lens < Lk
    (torch.float16, 64, 1, 130, [130, 77]),
    (torch.float16, 128, 77, 16, None),
    (torch.float32, 80, 33, 77, [0, 50]),  # CLIP's head dim (padded to 128), and a sample with no key
    (torch.float16, 80, 20, 20, None),
])
def test_kernel_attention(K, dtype, D, Lq, Lk, k_lens):
    o, (dq, dk, dv) = _compare_attention(K, dtype, D, Lq, Lk, k_lens, 1e-4 if dtype == torch.float32 else 2e-3)
    if k_lens is not None and k_lens[0] == 0:  # no key: output 0, no gradient, no NaN
        assert o[0].abs().max() == 0 and dq[0].abs().max() == 0 and dk[0].abs().max() == 0
    if k_lens is not None:  # masked keys get no gradient
        assert dk[1, k_lens[1]:].abs().max() == 0 and dv[1, k_lens[1]:].abs().max() == 0


@gpu
@pytest.mark.parametrize("D,Lq,Lk,k_lens", [(128, 1000, 1000, [1000, 333]), (128, 777, 512, None),
                                            (64, 130, 77, None), (80, 257, 257, [257, 0])])
def test_kernel_attention_bf16(K, D, Lq, Lk, k_lens):
    _compare_attention(K, torch.bfloat16, D, Lq, Lk, k_lens, 2e-2, H=4)


def test_kernel_attention_strided(K):
    # q, k, v as views into one fused qkv projection [B, L, 3, H, D], and a transposed upstream gradient:
    # the kernel must read them through their strides
    g = torch.Generator().manual_seed(0)
    qkv = _randn(2, 37, 3, 2, 64, gen=g)
    do = torch.randn(2, 2, 37, 64, generator=g).to(DEV).transpose(1, 2)
    o = K.attention(*qkv.unbind(2))
    grad = torch.autograd.grad(o, qkv, do)[0]
    qkv_ref = qkv.detach().double().requires_grad_()
    o_ref = K.attention_ref(*qkv_ref.unbind(2))
    _check((o, grad), (o_ref, torch.autograd.grad(o_ref, qkv_ref, do.double())[0]), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope", [True, False])
def test_kernel_qk_norm_rope(K, dtype, rope, monkeypatch):
    monkeypatch.setattr(K._qk_norm_rope, "TILE", 1024)  # 16 tokens per tile, as on a GPU at this width
    B, L, H, hd = 2, 37, 3, 16  # D = 48: half the width is not a power of two; 37 tokens: 3 tiles of 16
    g = torch.Generator().manual_seed(0)
    xw = _randn(B, L, 2 * H * hd, gen=g, dtype=dtype)
    x = xw[..., H * hd:]  # a strided view (row stride 2D), as from a fused projection
    w = _randn(H * hd, gen=g, scale=0.3, shift=1.0)
    ang = torch.rand(L, hd // 2, generator=g).to(DEV) * 2 * math.pi
    cs = (ang.cos(), ang.sin()) if rope else (None, None)
    y = K.qk_norm_rope(x, w, H, 1e-6, *cs)
    assert y.shape == (B, L, H, hd) and y.dtype == dtype
    grads, dy = _grads(y, (xw, w))
    y_ref = K.qk_norm_rope_ref(x, w, H, 1e-6, *cs)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    _check((y, *grads), (y_ref, *torch.autograd.grad(y_ref, (xw, w), dy)), tol)


@pytest.mark.parametrize("dtype,L,H", [(torch.float32, 5, 2)] + ([(torch.bfloat16, 300, 40)] if DEV == "cuda" else []))
def test_kernel_qk_norm_rope_head_dim_128(K, dtype, L, H):
    g = torch.Generator().manual_seed(0)
    x, w = _randn(1, L, H * 128, gen=g, dtype=dtype), _randn(H * 128, gen=g)
    ang = torch.rand(L, 64, generator=g).to(DEV) * 2 * math.pi
    y = K.qk_norm_rope(x, w, H, 1e-6, ang.cos(), ang.sin())
    grads, dy = _grads(y, (x, w))
    y_ref = K.qk_norm_rope_ref(x, w, H, 1e-6, ang.cos(), ang.sin())
    _check((y, *grads), (y_ref, *torch.autograd.grad(y_ref, (x, w), dy)), 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype,out_dtype,D", [(torch.float32, None, 40), (torch.float32, torch.float16, 40),
                                               (torch.float32, torch.bfloat16, 40), (torch.bfloat16, None, 40),
                                               (torch.float16, None, 40),
                                               (torch.float32, torch.bfloat16, 5120)])
def test_kernel_ln_modulate(K, dtype, out_dtype, D, monkeypatch):
    monkeypatch.setattr(K._norm, "TILE", 1024)  # 16 tokens per tile at D = 40, as on a GPU
    B, L = 2, 37  # 37 tokens: several row tiles, strided over two programs in the backward
    g = torch.Generator().manual_seed(0)
    x = _randn(B, L, D, gen=g, dtype=dtype, scale=2.0, shift=3.0)
    e = _randn(B, 6, D, gen=g)
    shift = e.chunk(6, dim=1)[2]  # (B, 1, D), strided like the model's modulation chunks
    scale = _randn(1, 1, D, gen=g, scale=0.5)  # broadcast over the batch
    y = K.ln_modulate(x, shift, scale, 1e-6, out_dtype)
    assert y.dtype == (out_dtype or dtype) and y.shape == x.shape
    grads, dy = _grads(y, (x, e, scale))
    y_ref = K.ln_modulate_ref(x, shift, scale, 1e-6, out_dtype)
    tol = 1e-5 if y.dtype == torch.float32 and dtype == torch.float32 else 2e-2
    _check((y, *grads), (y_ref, *torch.autograd.grad(y_ref, (x, e, scale), dy)), tol)


def test_kernel_dispatch(K, monkeypatch):
    q = torch.randn(1, 5, 2, 16, device=DEV)
    for mode, want in (("torch", False), ("triton", True), ("auto", True)):
        monkeypatch.setattr(K, "MODE", mode)
        assert K.use_triton(q) is want
        torch.testing.assert_close(K.attention(q, q, q), K.attention_ref(q, q, q))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(K, "MODE", "auto")  # CPU tensors without the interpreter: the reference
    assert not K.use_triton(q.cpu())
    monkeypatch.setattr(K, "MODE", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.use_triton(q.cpu())


def test_kernel_errors_say_what_is_wrong(K):
    q = torch.randn(1, 5, 2, 16, device=DEV)
    with pytest.raises(TypeError, match="one dtype"):
        K.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="k_lens must have shape"):
        K.attention(q, q, q, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"cos/sin must be \[L, head_dim/2\]"):
        K.qk_norm_rope(q.flatten(2), torch.ones(32, device=DEV), 2, 1e-6, *torch.ones(2, 5, 4, device=DEV))
    with pytest.raises(ValueError, match="shift, scale"):
        K.ln_modulate(q.flatten(2), q[:, :2].flatten(2), q[:, :1].flatten(2), 1e-6)


def test_no_top_level_name_shadows_a_known_package():
    """The repo folder is on sys.path when people run its scripts: a top-level `kernels` (the design card's name) hid
    Hugging Face's `kernels` package, which transformers >= 5 imports, so diffusers failed beside vpae."""
    names = {os.path.splitext(f)[0] for f in os.listdir(HERE) if f.endswith(".py") or os.path.isdir(os.path.join(HERE, f))}
    assert not names & {"kernels", "diffusers", "transformers", "accelerate", "safetensors", "tokenizers", "triton",
                        "einops", "imageio", "torch", "numpy", "huggingface_hub"}


@pytest.mark.parametrize("first", ["vpae", "diffusers"])
def test_vpae_and_diffusers_in_one_process(first):
    """`from model import WanModel` and `from diffusers import WanTransformer3DModel` in either order, in the repo
    folder (run where diffusers is installed)."""
    pytest.importorskip("diffusers")
    lines = ["from model import WanModel", "from diffusers import WanTransformer3DModel"]
    code = "\n".join(lines if first == "vpae" else lines[::-1])
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_kernel_without_triton():
    # a machine without Triton still imports kernels and runs the references; forcing Triton says why it cannot
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, vpae_kernels as kernels\n"
            "assert not kernels.HAVE_TRITON\n"
            "q = torch.randn(1, 3, 2, 8); kernels.attention(q, q, q)\n"
            "kernels.MODE = 'triton'\n"
            "try:\n    kernels.attention(q, q, q)\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VPAE_KERNELS")}
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused: VPAE_KERNELS=triton but Triton is not installed" in r.stdout, r.stderr


def test_kernel_bench_tiny(K):
    import bench
    bench.kernels_bench(tiny=True)


def test_kernel_tiny_model_kernels_vs_torch(K, monkeypatch):
    torch.manual_seed(0)
    m = M.WanModel(M.PRESETS["tiny"]).to(DEV)
    with torch.no_grad():
        for p in m.parameters():  # all random: the official init zeroes the head, which would hide bugs
            p.normal_(0, 0.5 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1)
    cfg = m.cfg
    x, ctx = torch.randn(2, cfg.in_dim, 2, 4, 6, device=DEV), torch.randn(2, 7, cfg.text_dim, device=DEV)
    t = torch.tensor([999, 250], device=DEV)
    outs, calls = {}, []
    for mod, name in ((K._attention, "flash_attention"), (K._norm, "ln_modulate"), (K._qk_norm_rope, "qk_norm_rope")):
        f = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, f=f, **kw: calls.append(f.__name__) or f(*a, **kw))
    for mode in ("torch", "triton"):
        monkeypatch.setattr(K, "MODE", mode)
        m.zero_grad()
        out = m(x, t, ctx)
        out.square().mean().backward()
        outs[mode] = [out.detach()] + [p.grad.clone() for p in m.parameters()]
    assert {"flash_attention", "ln_modulate", "qk_norm_rope"} == set(calls)  # only the triton run calls them
    _check(outs["triton"], outs["torch"], 1e-4)




# =============================================================================
# LoRAs: distill.py --export_lora, sample.py --lora; sample.py --offload blocks

import distill  # noqa: E402

BLOCK_LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"]  # the issue's list


@pytest.fixture(scope="module")
def lora_run(i2v_ckpt, tmp_path_factory):
    """A run folder with a student of the tiny i2v teacher (every parameter moved but the patch embedding's),
    and its LoRA exports at rank 4 (truncated) and 64 (the width: exact), fp32."""
    run = str(tmp_path_factory.mktemp("lora_run"))
    student, g = WanModel.from_pretrained(i2v_ckpt), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if not name.startswith("patch_embedding"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, os.path.join(run, "student.safetensors"))
    for r in (4, 64):
        distill.main([f"--export_lora={r}", f"--teacher={i2v_ckpt}", f"--out={run}", "--export_dtype=fp32"])
    return run, student


def lora_file(run, r):
    return os.path.join(run, f"student_lora_rank{r}.safetensors")


def test_lora_round_trip(i2v_ckpt, lora_run):
    run, student = lora_run
    teacher, want = WanModel.from_pretrained(i2v_ckpt).state_dict(), student.state_dict()
    full = sample.load_dit(i2v_ckpt, torch.float32, "cpu", loras=[(lora_file(run, 64), 1.0)])
    for k, v in full.state_dict().items():  # full rank: the student, up to fp32 rounding of the SVD
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=0, msg=k)
    x, t, ctx, kw = inputs(full.cfg, L=5)
    with torch.no_grad():
        torch.testing.assert_close(full(x, t, ctx, **kw), student(x, t, ctx, **kw), atol=1e-5, rtol=1e-5)
    low = sample.load_dit(i2v_ckpt, torch.float32, "cpu", loras=[(lora_file(run, 4), 1.0)]).state_dict()
    for k in want:  # rank 4: each block Linear's error is what the SVD drops, everything else is exact
        if k.endswith(".weight") and any(k.endswith(f"{n}.weight") for n in BLOCK_LINEARS):
            dropped = torch.linalg.svdvals(want[k].double() - teacher[k].double())[4:].square().sum().sqrt()
            assert dropped > 0.01
            torch.testing.assert_close((low[k] - want[k]).double().norm(), dropped, rtol=1e-4, atol=0, msg=k)
        else:
            torch.testing.assert_close(low[k], want[k], atol=1e-6, rtol=0, msg=k)
    half = sample.load_dit(i2v_ckpt, torch.float32, "cpu", loras=[(lora_file(run, 64), 0.5)] * 2)  # SCALE, repeated
    torch.testing.assert_close(half.state_dict()["blocks.1.ffn.2.weight"], want["blocks.1.ffn.2.weight"], atol=1e-6, rtol=0)
    assert sample.parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert sample.parse_lora("c:/b.safetensors") == ("c:/b.safetensors", 1.0)


def test_lora_key_format(i2v_ckpt, lora_run):
    from safetensors.torch import load_file
    run, _ = lora_run
    sd = load_file(lora_file(run, 4))
    assert all(k.startswith("diffusion_model.") for k in sd)
    names = {k.removeprefix("diffusion_model.") for k in sd}
    for i in range(2):
        for n in BLOCK_LINEARS:
            p = f"blocks.{i}.{n}"
            lin = WanModel.from_pretrained(i2v_ckpt).get_submodule(p)
            assert sd[f"diffusion_model.{p}.lora_down.weight"].shape == (4, lin.in_features)
            assert sd[f"diffusion_model.{p}.lora_up.weight"].shape == (lin.out_features, 4)
            assert sd[f"diffusion_model.{p}.alpha"].item() == 4 and f"{p}.diff_b" in names
        assert {f"blocks.{i}.modulation.diff", f"blocks.{i}.norm3.diff", f"blocks.{i}.norm3.diff_b",
                f"blocks.{i}.self_attn.norm_q.diff", f"blocks.{i}.cross_attn.norm_k_img.diff"} <= names
    for n in ("text_embedding.0", "time_embedding.2", "time_projection.1", "head.head", "img_emb.proj.1"):
        assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.diff_b"} <= names and f"{n}.alpha" not in names
    assert {"head.modulation.diff", "img_emb.proj.0.diff", "img_emb.proj.0.diff_b"} <= names
    assert not any(k.startswith("patch_embedding") for k in names)  # unchanged: not written
    assert not any(w in k for k in names for w in ("attn1", "attn2", "to_q", "lora_A"))  # no diffusers names
    assert {k.split(".")[-1] for k in names} == {"weight", "alpha", "diff", "diff_b"}
    assert len({v.dtype for v in sd.values()}) == 1


def test_lora_spellings_and_errors(i2v_ckpt, lora_run, image, tmp_path, capsys):
    from safetensors.torch import load_file
    run, student = lora_run
    sd = load_file(lora_file(run, 64))
    other = {k.removeprefix("diffusion_model.").replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
             for k, v in sd.items()}  # the lora_A/lora_B spelling, without the prefix
    save_file(other, str(tmp_path / "ab.safetensors"))
    m = sample.load_dit(i2v_ckpt, torch.float32, "cpu", loras=[(str(tmp_path / "ab.safetensors"), 1.0)])
    torch.testing.assert_close(m.state_dict()["blocks.0.cross_attn.k_img.weight"],
                               student.state_dict()["blocks.0.cross_attn.k_img.weight"], atol=1e-6, rtol=0)
    bad = dict(sd)
    bad["diffusion_model.blocks.7.ffn.0.diff_b"] = torch.zeros(96)  # no block 7
    bad["diffusion_model.blocks.0.ffn.0.diff_b"] = torch.zeros(5)  # wrong shape
    del bad["diffusion_model.blocks.1.self_attn.q.lora_up.weight"]  # half a pair
    bad["diffusion_model.blocks.0.ffn.0.lora_mid.weight"] = torch.zeros(1)  # not a LoRA key
    save_file(bad, str(tmp_path / "bad.safetensors"))
    teacher = WanModel.from_pretrained(i2v_ckpt)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(ValueError) as e:
        sample.merge_lora(teacher, str(tmp_path / "bad.safetensors"))
    for needle in ("blocks.7.ffn.0.diff_b (no such weight)", "blocks.0.ffn.0.diff_b (an update of (5,)",
                   "blocks.1.self_attn.q.lora_down.weight (half", "blocks.1.self_attn.q.alpha (half",
                   "lora_mid.weight (not a LoRA key)", "5 key(s)"):
        assert needle in str(e.value), needle
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # nothing merged
    args = ["--ckpt_dir", i2v_ckpt, "--image", image, "--frames", "5", "--size", "32*32", "--out", str(tmp_path / "o.mp4")]
    for lora, needle in ((str(tmp_path / "bad.safetensors"), "no such weight"), ("nope.safetensors", "--lora nope")):
        with pytest.raises(SystemExit) as e:
            sample.main(args + ["--lora", lora])
        assert str(e.value.code).startswith("sample.py: error: ") and needle in str(e.value.code)
        assert "\n" not in str(e.value.code)
    # the export: a missing student, an existing output (left alone), a folder that is no checkpoint
    for argv, needle in (([f"--teacher={i2v_ckpt}", f"--out={tmp_path}"], "student.safetensors not found"),
                         ([f"--teacher={i2v_ckpt}", f"--out={run}"], "exists: delete it"),
                         ([f"--teacher={tmp_path}", f"--out={run}", "--export_lora=5"], "config.json not found")):
        size = os.path.getsize(lora_file(run, 4))
        with pytest.raises(SystemExit, match=needle):
            distill.main(argv + (["--export_lora=4"] if "--export_lora=5" not in argv else []))
        assert os.path.getsize(lora_file(run, 4)) == size
    assert not os.path.exists(os.path.join(run, "student_lora_rank5.safetensors"))


# diffusers' WanTransformer3DModel names -> Wan's, for the modules its LoRA converter writes
DIFFUSERS_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
                   "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
                   "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
                   "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
                   "condition_embedder.text_embedder.linear_1": "text_embedding.0",
                   "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                   "condition_embedder.time_embedder.linear_1": "time_embedding.0",
                   "condition_embedder.time_embedder.linear_2": "time_embedding.2",
                   "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
                   "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
                   "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3"}


def test_lora_diffusers_converter_accepts_the_export(i2v_ckpt, lora_run):
    pytest.importorskip("diffusers")  # optional: diffusers is not a dependency
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
    from safetensors.torch import load_file
    run, student = lora_run
    for r in (4, 64):
        conv = _convert_non_diffusers_wan_lora_to_diffusers(load_file(lora_file(run, r)))
        m = WanModel.from_pretrained(i2v_ckpt)
        params, placed = dict(m.named_parameters()), set()
        with torch.no_grad():  # merge the converted LoRA by diffusers' names: W += B @ A, b += lora_B.bias
            for k, v in conv.items():
                mod, kind = k.removeprefix("transformer.").rsplit(".lora_", 1)
                _, i, rest = mod.split(".", 2) if mod.startswith("blocks.") else (None, None, mod)
                name = (f"blocks.{i}." if i else "") + DIFFUSERS_NAMES[rest]
                if kind == "A.weight":
                    params[name + ".weight"].add_(conv[k.replace("lora_A", "lora_B")] @ v)
                elif kind == "B.bias":
                    params[name + ".bias"].add_(v)
                placed.add(name)
        lin = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        assert placed == set(lin)  # every Linear's update reaches diffusers
        want = student.state_dict()
        teacher = WanModel.from_pretrained(i2v_ckpt).state_dict()
        for k, v in m.state_dict().items():
            if k.rpartition(".")[0] in lin:
                if r == 64 or not k.startswith("blocks.") or k.endswith(".bias"):
                    torch.testing.assert_close(v, want[k], atol=1e-6, rtol=0, msg=k)
            else:  # what diffusers drops: norms, modulations, the patch embedding
                assert torch.equal(v, teacher[k]), k


def test_offload_blocks_streams_one_ahead_and_matches_plain():
    cfg = tiny_cfg("i2v", num_layers=4)
    m = random_model(cfg)
    x, t, ctx, kw = inputs(cfg)
    with torch.no_grad():
        want = m(x, t, ctx, **kw)
        stream = sample.BlockStream(m, "cpu")
        seen = []  # at each block's start: the blocks in place, and those copied or on their way
        for b in m.blocks:
            b.register_forward_pre_hook(lambda mod, a: seen.append(
                ([j for j, o in enumerate(m.blocks) if o.ffn[0].weight.numel()], sorted(stream.ready))))
        assert all(p.numel() == 0 for p in m.blocks.parameters())  # between calls, no block is resident
        for _ in range(2):
            assert torch.equal(m(x, t, ctx, **kw), want)
    assert seen[:4] == [([0], [1]), ([1], [2]), ([2], [3]), ([3], [])] and seen[4:] == seen[:4]  # i runs, i+1 arrives
    assert all(p.numel() == 0 for p in m.blocks.parameters()) and not stream.ready


def test_sample_lora_offload_blocks_and_vae_dtype(i2v_ckpt, lora_run, image, tmp_path, capsys):
    run, _ = lora_run
    args = ["--ckpt_dir", i2v_ckpt, "--image", image, "--frames", "5", "--size", "32*32"]
    vid = lambda name, *a: read_mp4(sample.main(args + ["--out", str(tmp_path / name), *a]))  # noqa: E731
    plain = vid("plain.mp4", "--student", os.path.join(run, "student.safetensors"))
    assert np.array_equal(vid("blocks.mp4", "--student", os.path.join(run, "student.safetensors"), "--offload",
                              "blocks"), plain)
    lora = vid("lora.mp4", "--lora", lora_file(run, 64), "--offload", "blocks")  # full rank: the student
    assert np.abs(lora.astype(int) - plain).mean() < 0.2  # H.264 turns fp32 rounding into a few changed pixels
    capsys.readouterr()
    bf16 = vid("bf16.mp4", "--student", os.path.join(run, "student.safetensors"), "--vae_dtype", "bf16")
    diff = np.abs(bf16.astype(int) - plain)
    assert 0.5 < diff.mean() < 8  # the decode ran in bf16, near the fp32 one
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("time: "))
    stages = dict(re.findall(r"(\w[\w ]*?) ([\d.]+)s", line.split(" | total")[0].removeprefix("time: ")))
    total, without = map(float, re.search(r"total ([\d.]+)s, ([\d.]+)s without the VAE decode", line).groups())
    assert list(stages) == ["load", "text", "image", "DiT", "VAE decode"]
    assert abs(total - sum(map(float, stages.values()))) < 0.3 and abs(without - total + float(stages["VAE decode"])) < 0.3


def test_toy_lora_table_exports_merges_and_measures(i2v_ckpt, lora_run, tmp_path):
    # the pieces of `toy.py --lora-table` on the tiny checkpoint (width 64: ranks 16 and 64 = full); the command
    # itself, on the bundled student, is `python toy.py --lora-table --quick` (about 1.5 min on 2 busy cores)
    import toy
    run, student = lora_run
    path = os.path.join(run, "student.safetensors")
    runs, rows = toy.lora_table(i2v_ckpt, [path], str(tmp_path), lambda msg: None)
    assert list(runs) == ["full", "lora16", "lora64", "diffusers"] and runs["full"] == [path]
    assert [r[1] for r in rows] == list(runs) and "(full)" in rows[2][0] and "(full)" not in rows[1][0]
    teacher, want = WanModel.from_pretrained(i2v_ckpt).state_dict(), student.state_dict()
    merged = WanModel.from_pretrained(i2v_ckpt, weights=runs["lora64"][0]).state_dict()
    assert all(torch.allclose(merged[k], want[k], atol=1e-6, rtol=0) for k in want)
    dropped = total = 0  # the rank-16 error from the singular values of each block Linear's difference
    for k in want:
        if k.startswith("blocks.") and want[k].dim() == 2:
            s = torch.linalg.svdvals(want[k].double() - teacher[k].double())
            dropped, total = dropped + s[16:].square().sum(), total + s.square().sum()
    err = float(re.search(r"weight error ([\d.]+)", rows[1][0])[1])
    assert abs(err - float(dropped / total) ** 0.5) < 1e-3 and err > 0.01
    assert float(re.search(r"weight error ([\d.]+)", rows[2][0])[1]) == 0
    kept = WanModel.from_pretrained(i2v_ckpt, weights=runs["diffusers"][0]).state_dict()  # the Linears' differences only
    assert torch.equal(kept["blocks.1.ffn.2.bias"], merged["blocks.1.ffn.2.bias"])
    assert torch.equal(kept["blocks.1.modulation"], teacher["blocks.1.modulation"]) and not torch.equal(
        kept["blocks.1.modulation"], want["blocks.1.modulation"])
    assert os.path.isfile(tmp_path / "lora" / "s0" / "student_lora_rank16.safetensors")
    with pytest.raises(SystemExit, match=r"full_s0/student.safetensors not found: run `python toy.py` first"):
        toy.main(["--lora-table", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=r"--csds-pull: nope.safetensors not found: give a student.safetensors"):
        toy.main(["--csds-pull", "nope.safetensors", "--out", str(tmp_path / "none")])
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.parametrize("argv,msg", [(["--phase2", "0"], "--phase2 0: give a positive step count"),
                                      (["--runs", "no_adv"], "--runs no_adv: a comma-separated subset"),
                                      (["--sweep", "nope"], "--sweep nope: the candidates are"),
                                      (["--seeds", "0"], "--seeds 0: give 1 or more"),
                                      (["--peers", "dmd,nope"], "--peers dmd,nope: a comma-separated subset of dmd,"),
                                      (["--peer-sweep", "nope"], "--peer-sweep nope: a comma-separated subset"),
                                      (["--on-eval"], "--on-eval reports --sweep candidates: give --sweep NAMES")])
def test_toy_bad_arguments_stop_with_one_line_before_any_work(argv, msg, tmp_path, capsys):
    import toy
    with pytest.raises(SystemExit):
        toy.main(argv + ["--out", str(tmp_path / "out")])
    assert msg in capsys.readouterr().err and not os.path.exists(tmp_path / "out")


def test_toy_starts_from_the_bundled_teacher(tmp_path):
    """Without --train-teacher the run's ckpt is the bundled encoders, VAE and teacher (not the student); a ckpt with
    a VAE trained here and no teacher (an interrupted --train-teacher run) is never overwritten."""
    import toy
    ckpt, demo = tmp_path / "ckpt", os.path.join(HERE, "assets", "demo")
    os.makedirs(ckpt)
    data.write_json({"_class_name": "WanModel", "_diffusers_version": "0.30.0", **toy.DIT}, str(ckpt / "config.json"))
    toy.copy_bundled(str(ckpt))
    for f in ("diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth", "google/umt5-xxl/tokenizer.json"):
        assert open(ckpt / f, "rb").read() == open(os.path.join(demo, f), "rb").read()
    assert not os.path.exists(ckpt / "student.safetensors") and "vpae_demo" not in json.load(open(ckpt / "config.json"))
    data.write_json({**toy.DIT, "dim": 64}, str(ckpt / "config.json"))
    with pytest.raises(SystemExit, match="not of toy.DIT's shape: run with --train-teacher"):
        toy.copy_bundled(str(ckpt))
    os.remove(ckpt / "diffusion_pytorch_model.safetensors")
    with pytest.raises(SystemExit, match="holds a VAE trained here but no teacher yet: add --train-teacher"):
        toy.main(["--out", str(tmp_path)])


def test_toy_peers_are_distill_configurations_and_equal_time_counts_training_seconds():
    """Each peer of toy.py --peers is a distill.py configuration over V-PAE's budget of generator steps; the equal-time
    student is the last checkpoint within V-PAE's training seconds, at most that budget."""
    import distill
    import toy
    for name, argv in toy.PEERS.items():
        c = distill.parse_args(toy.RECIPE + argv(1200) + toy.PEER_RECIPE[name])
        assert c.phase1_steps + c.phase2_steps == 1200
        assert (c.phase2_steps == 0 and c.sigma_g_min == 1 and c.k_fake == 5) if name.startswith("dmd") else \
            (c.phase1_steps == 0 and c.lambda_csds == 0 and c.disc_backbone == "teacher")
        assert (c.gan_weight > 0) == (name == "dmd2")
    secs = {"vpae_phase1": 0.5, "vpae_phase2": 1.0, "dmd": 1.6, "adv_only": 0.8}  # V-PAE: 200 x 0.5 + 400 x 1 s
    assert toy.equal_time_step(secs, "dmd", 200, 400) == 300 and toy.equal_time_step(secs, "adv_only", 200, 400) == 600


def test_toy_checks_the_papers_peer_ordering_at_equal_steps_and_at_equal_time():
    """The paper ranks APT over DMD2: toy.py tests it between the rows of equal steps, and between those of equal time."""
    import toy
    row = lambda fd: {"nfe": 1, **{k: [[v] for v in [0.0, 0.1, 0.2]] for k in toy.METRICS}, "fd": [[v] for v in fd]}  # noqa: E731
    r = {"V-PAE student, 1 step": row([10, 11, 12]), "DMD2, 600 steps, 1 step": row([20, 21, 22]), "adversarial only (APT-style), 600 steps, 1 step": row([15, 16, 17]),
         "DMD2, V-PAE's time (300 steps), 1 step": row([15, 16, 17]),
         "adversarial only (APT-style), V-PAE's time (600 steps), 1 step": row([15, 16, 17])}
    got = [(s.split(" beats ")[1].split(" on ")[0], ok) for s, ok in toy.checks(r) if s.startswith("adversarial")]
    assert got == [("DMD2, 600 steps, 1 step", True), ("DMD2, V-PAE's time (300 steps), 1 step", False)]


def test_toy_peer_choice_ranks_each_peers_candidates_over_every_metric():
    import toy
    res = {f"psweep_{k}, 1 step": {"nfe": 1, **{m: [[v]] for m in toy.METRICS}}
           for k, v in [("dmd", 10.0), ("dmd_k1", 12.0), ("dmd_lr3e-5", 11.0), ("dmd2", 9.0)]}
    res["psweep_dmd_k1, 1 step"]["w1"] = [[1.0]]  # worst FD, best on every other metric
    assert toy.peer_choice(res) == ["- dmd: dmd_k1 1.33; dmd_lr3e-5 2.17; dmd 2.50 (mean rank; chosen: dmd_k1)"]


def test_toy_will_not_reuse_a_finished_run_of_another_phase2_length(tmp_path):
    """A finished run left in --out by another --phase2 stops toy.py with one line, before any work."""
    import toy
    for name in ("train", "eval", "val"):  # the stages before the runs, marked done
        os.makedirs(tmp_path / f"{name}_videos"), os.makedirs(tmp_path / f"{name}_latents")
        open(tmp_path / f"{name}_videos" / "captions.jsonl", "w").close()
        open(tmp_path / f"{name}_latents" / "neg_context.safetensors", "w").close()
    run = tmp_path / "distill" / "full_s0"
    os.makedirs(run / "ckpt_00000120")
    open(run / "student.safetensors", "w").close()
    with open(run / "ckpt_00000120" / "config.json", "w") as f:
        json.dump({"phase2_steps": 80}, f)
    with pytest.raises(SystemExit, match=r"full_s0 is a finished run of 80 Phase II steps, not the 50 asked for"):
        toy.main(["--quick", "--out", str(tmp_path), "--phase2", "50"])


# =============================================================================
# a newcomer's first hour: the README's Distil block on the demo, distill.py --help, one-line stops under
# torchrun, sample.py's and data.py's small surprises, T2V distillation


def readme_block(after):
    """The commands of the first ```bash block after `after` in README.md, each split into words (comments dropped)."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text[text.index(after):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].split() for line in block.splitlines() if line.strip()]


def test_readme_distil_runs_on_the_demo(tmp_path):
    """The README's demo commands as written, in a fresh folder, with fewer clips and steps: clips to a sampled student."""
    os.symlink(os.path.join(HERE, "assets"), tmp_path / "assets")
    fewer = {"64": "2", "--phase1_steps=20": "--phase1_steps=1", "--phase2_steps=20": "--phase2_steps=1",
             "--batch_size=8": "--batch_size=2"}
    cmds = readme_block("The whole path on the bundled demo")
    assert [c[:2] for c in cmds] == [["python", "data.py"]] * 2 + [["python", "distill.py"], ["python", "sample.py"]]
    assert set(fewer) <= set(sum(cmds, []))
    for c in cmds:
        r = subprocess.run([sys.executable, os.path.join(HERE, c[1])] + [fewer.get(w, w) for w in c[2:]],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, " ".join(c) + "\n" + r.stdout[-2000:] + r.stderr[-2000:]
    assert read_mp4(str(tmp_path / "run" / "student.mp4")).shape == (17, 64, 64, 3)


def test_distill_help_lists_every_field_and_takes_field_value(capsys):
    import dataclasses
    import distill
    with pytest.raises(SystemExit) as e:
        distill.parse_args(["--help"])
    out = capsys.readouterr().out
    lines = [x.strip() for x in out.splitlines() if x.startswith("  --")]
    assert e.value.code == 0 and [x.split("=")[0] for x in lines] == [f"--{f.name}" for f in dataclasses.fields(distill.Config)]
    assert out.startswith("  torchrun --nproc_per_node=8 distill.py") and "distill.py --export_from=" in out  # examples
    assert all(x.split(")  ", 1)[1:] for x in lines)  # each with its comment
    ref = next(x for x in lines if x.startswith("--disc_shift_ref="))
    assert "--disc_shift_ref=32760  (int)  scale" in ref and ref.endswith("0 = fixed")  # a 3-line comment
    cfg = distill.parse_args(["--phase1_steps", "7", "--beta1", "-0.5", "--semantic=false"])
    assert (cfg.phase1_steps, cfg.beta1, cfg.semantic) == (7, -0.5, False)
    with pytest.raises(SystemExit, match="distill.py --help lists them"):
        distill.parse_args(["--phase1_step=3"])
    with pytest.raises(SystemExit, match="--teacher and --data are required, e.g. distill.py --teacher="):
        distill.main([])
    with pytest.raises(SystemExit, match="--grad_clip=-1.0: use a value >= 0"):
        distill.parse_args(["--grad_clip=-1"])
    with pytest.raises(SystemExit, match="--csds_guide_until=1.5 .*: use a sigma in"):
        distill.parse_args(["--csds_guide_scale=7.5", "--csds_guide_until=1.5"])
    assert M.Discriminator(128, [0]).heads[0].queries.shape[-1] == 128  # disc_width 0: the backbone's dim, <= 1024
    with torch.device("meta"):
        assert M.Discriminator(5120, [0]).heads[0].queries.shape[-1] == 1024


def test_distill_user_errors_once_under_torchrun(i2v_ckpt, latents, tmp_path):
    """One line from rank 0, exit 1, no traceback from distill.py (torchrun adds its own ChildFailedError report)."""
    done = tmp_path / "done"
    done.mkdir()
    (done / "student.safetensors").write_bytes(b"")
    for args, what in (([f"--out={done}"], "this run has finished"),
                       ([f"--out={tmp_path / 'b'}", "--batch_size=8", "--micro_batch=4"], "4 clips; --batch_size=8")):
        r = run_distill([f"--teacher={i2v_ckpt}", f"--data={latents}"] + args, nproc=2)
        text = r.stdout + r.stderr
        assert r.returncode == 1 and text.count("distill.py: error:") == 1 and what in text, text[-3000:]
        assert 'distill.py", line' not in text


def children(pid):
    """The pids whose parent is pid (from /proc)."""
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                kids += [int(d)] if int(f.read().rsplit(")", 1)[1].split()[1]) == pid else []
        except OSError:
            pass
    return kids


def test_distill_sigterm_to_the_ranks_under_torchrun(i2v_ckpt, latents, tmp_path):
    """SIGTERM to torchrun's ranks (the README's way): a checkpoint, one line, and torchrun exits 0, no traceback."""
    import signal
    out = str(tmp_path / "term")
    p = start_distill([f"--teacher={i2v_ckpt}", f"--data={latents}", "--phase1_steps=1000", "--ckpt_every=1000"], out, 2)
    ranks = children(p.pid)
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    text, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and text.count("checkpoint saved; rerun to resume") == 1, text[-3000:]
    assert "Traceback" not in text and "error" not in text.lower()
    assert [d for d in os.listdir(out) if d.startswith("ckpt_")] != []


def test_sample_small_surprises(i2v_ckpt, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--ckpt_dir", i2v_ckpt, "--frames", "5", "--size", "40*40", "--prompt", "a cat"]
    other = str(tmp_path / "y.png")
    imageio.imwrite(other, np.zeros((40, 56, 3), np.uint8))
    a, b = sample.main(args + ["--image", image]), sample.main(args + ["--image", other])
    assert (a, b) == ("x_a_cat_student1_seed0.mp4", "y_a_cat_student1_seed0.mp4") and os.path.isfile(a)
    assert "--size 40*40 at the shape of" in capsys.readouterr().out and read_mp4(a).shape[1:3] == (32, 32)
    for extra, what in ((["--steps", "0"], "--steps must be at least 1"), (["--device", "cuda"], "no CUDA GPU")):
        if what == "no CUDA GPU" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as e:
            sample.main(args + ["--image", image, "--out", "z.mp4"] + extra)
        assert str(e.value.code).startswith("sample.py: error: " + extra[0]) and what in str(e.value.code)


def test_precompute_no_usable_clip_says_what_fits(t2v_ckpt, videos, tmp_path):
    out = str(tmp_path / "lat")
    with pytest.raises(SystemExit) as e:
        data.main(["--ckpt_dir", t2v_ckpt, "--videos", videos, "--out", out, "--frames", "81", "--size", "16*16"])
    msg = str(e.value.code)
    assert msg.startswith("data.py: error: no usable clip") and "\n" not in msg
    assert "--frames 17 or fewer" in msg and "--size such as 64*48" in msg
    data.main(["--ckpt_dir", t2v_ckpt, "--videos", videos, "--out", out, "--frames", "17", "--size", "16*16"])
    assert len(data.LatentDataset(out)) == 4  # the same --out: the manifest without clips is started anew


def test_distill_t2v_two_processes_both_phases(t2v_ckpt, videos, tmp_path):
    """T2V on 2 ranks, sp=2, both phases, from a video folder (precomputed over both ranks at the frames and size a
    demo-style config.json names); after the export only the newest checkpoint is left."""
    ckpt = tmp_path / "t2v"
    ckpt.mkdir()
    for f in os.listdir(t2v_ckpt):
        if f != "config.json":
            os.symlink(os.path.join(t2v_ckpt, f), ckpt / f)
    with open(os.path.join(t2v_ckpt, "config.json")) as f:
        config = json.load(f) | {"vpae_demo": {"frames": 9, "size": "32*32"}}
    (ckpt / "config.json").write_text(json.dumps(config))
    out = str(tmp_path / "run")
    r = run_distill([f"--teacher={ckpt}", f"--data={videos}", f"--out={out}", "--phase1_steps=2", "--phase2_steps=2",
                     "--sp=2", "--ckpt_every=1"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = read_log(out)
    assert [x["phase"] for x in log] == [1, 1, 2, 2] and all(math.isfinite(v) for x in log for v in x.values())
    assert sorted(os.listdir(out)) == ["ckpt_00000002", "ckpt_00000003", "ckpt_00000004", "config.json", "latents",
                                       "log.jsonl", "student.safetensors"]  # the newest --keep_ckpts (3)
    lat = data.read_manifest(os.path.join(out, "latents"))
    assert len(lat["clips"]) == 4 and len({c["shard"] for c in lat["clips"]}) == 2  # both ranks encoded clips
    student = WanModel.from_pretrained(t2v_ckpt, weights=os.path.join(out, "student.safetensors"))
    teacher = WanModel.from_pretrained(t2v_ckpt)
    assert student.cfg.model_type == "t2v"
    assert max((a - b).abs().max() for a, b in zip(student.parameters(), teacher.parameters())) > 0


def test_precompute_on_two_ranks_equals_one(i2v_ckpt, videos, latents, tmp_path, capsys):
    """torchrun data.py on 2 gloo ranks: the clips split over the ranks, one manifest, the same clips as one process."""
    out = str(tmp_path / "lat2")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(HERE, "data.py"), "--ckpt_dir", i2v_ckpt, "--videos", videos, "--out", out,
                        "--frames", "9", "--size", "32*32", "--device", "cpu"],
                       capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 0 and r.stdout.count("clips to encode") == 1 and "over 2 ranks" in r.stdout, r.stderr[-3000:]
    one, two = data.read_manifest(latents), data.read_manifest(out)
    assert len({c["shard"] for c in two["clips"]}) == 2 and not data.parts(out)
    assert [{k: v for k, v in c.items() if k != "shard"} for c in two.pop("clips")] == \
        [{k: v for k, v in c.items() if k != "shard"} for c in one.pop("clips")]
    assert one == two  # model type, frames, size, skipped
    a, b = data.LatentDataset(latents), data.LatentDataset(out)
    torch.testing.assert_close(b.neg_context, a.neg_context)
    for i in range(len(a)):
        for k, v in a[i].items():
            torch.testing.assert_close(b[i][k], v, rtol=1e-5, atol=1e-5)
    data.precompute(i2v_ckpt, videos, out, frames=9, size="32*32")  # one process resumes it: nothing left to do
    assert "0 clips to encode" in capsys.readouterr().out


if __name__ == "__main__":
    slow_worker(sys.argv[2:]) if sys.argv[1] == "slow" else {"sp": sp_worker, "shard": shard_worker}[sys.argv[1]](sys.argv[2])


# =============================================================================
# GPU path without a GPU: Triton kernels built ahead of time for Hopper and Ampere (bench.py compile)


def test_kernels_compile_for_sm90a_and_sm80_without_spills():
    """Every kernel and autotune config of one Wan-14B block (32,760 tokens, head dim 128, width 5120, bf16) builds to
    cubin with the wheel's ptxas, spills no register, fits shared memory, and the attention dots use wgmma on sm_90a."""
    triton = pytest.importorskip("triton")
    import bench
    import vpae_kernels as kernels
    if kernels._attention.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 collapses the autotune configs")
    try:
        triton.knobs.nvidia.ptxas.path
    except Exception as e:  # e.g. a triton wheel without the NVIDIA backend's binaries
        pytest.skip(f"no ptxas: {e}")
    rows = bench.compile_table(bench.compile_cases(full=False))
    n_configs = sum(len(v) for by_arch in kernels._attention.CONFIGS.values() for v in by_arch.values())
    assert len(rows) == n_configs + 2 * (1 + 4)  # each arch its own list; + the delta kernel, 2 norm, 2 qk_norm_rope
    for r in rows:
        assert r["regs"] > 0 and r["spill_st"] == r["spill_ld"] == 0 and r["smem"] <= r["smem_max"], r
        if r["kernel"] in ("attention._fwd_kernel", "attention._bwd_dkdv_kernel", "attention._bwd_dq_kernel"):
            assert r["mma"] == ("wgmma" if r["arch"] == "sm_90a" else "mma"), r


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_memory_tracker_sees_distill_models_and_steps(device):
    """bench.py memory's tracker, on the tiny preset at world 2: the sharded parameters and Adam moments it reports are
    distill.Models' own (fp32, halved; with --device=cuda, a GPU's bf16 compute, the frozen teacher in bf16), every
    step peaks above its start, and the FLOPs are counted."""
    import distill
    from model import Discriminator
    r = subprocess.run([sys.executable, "bench.py", "memory", "--child", "--preset=tiny", "--size=64*64", "--frames=5",
                        "--world=2", "--sp=2", f"--device={device}"], cwd=HERE, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    cfg = distill.Config()
    with torch.device("meta"):
        gen, teacher = M.WanModel(M.PRESETS["tiny"]), M.WanModel(M.PRESETS["tiny"])
        distill.add_lora(teacher, cfg.lora_rank)
        disc = Discriminator(gen.cfg.dim, [0, 1], cfg.disc_width, cfg.disc_queries, cfg.semantic)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    lora, frozen = n(teacher) - n(gen), n(gen) * (2 if device == "cuda" else 4)  # the teacher's bytes
    params = (4 * (2 * n(gen) + lora + n(disc)) + frozen) / 2  # fp32 G, EMA, LoRA, heads, the teacher; over 2 ranks
    moments = 2 * 4 * (n(gen) + lora + n(disc)) / 2  # Adam's two fp32 moments of G, the LoRA and the heads
    assert len(rows) == 4 and all(r["flops"] > 0 for r in rows)
    for r in rows[:3]:
        assert r["peak"]["Sharded Param"] == pytest.approx(params, rel=0.01)
        assert r["peak"]["OptState"] == pytest.approx(moments, rel=0.01)
        assert r["peak"]["Total"] > r["start"]
    assert rows[2]["flops"] > rows[3]["flops"]  # the G step runs the generator, backbone and teacher, and backward


def test_fake_flops_and_peaks():
    """bench's MFU parts: FLOPs counted on fake tensors (a matmul is 2 m n k) and the datasheet peak by card name."""
    import bench
    assert bench.fake_flops(lambda: torch.nn.Linear(48, 32, bias=False)(torch.randn(8, 48))) == 2 * 8 * 48 * 32
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == bench.peak_tflops("NVIDIA H200") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.5 and bench.peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_gpu_acceptance_run_tiny(tmp_path):
    """bench.py gpu --tiny: the whole GPU acceptance run at tiny sizes on CPU (interpreted), one call, its JSON."""
    pytest.importorskip("triton")
    out = tmp_path / "summary.json"
    r = subprocess.run([sys.executable, "bench.py", "gpu", "--tiny", f"--out={out}"], cwd=HERE, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    for key in ("attention_check", "attention_speed", "fused_ops", "dit_forward", "dit_train_memory", "distill", "sample"):
        assert s[key], key
    assert s["distill"]["steps"] == 4 and s["distill"]["exported"]
    assert s["dit_forward"]["flops"] > 0 and s["dit_forward"]["tflops_s"] > 0 and s["dit_forward"]["mfu"] is None  # CPU
    assert s["dit_train_memory"]["tracked_peak_gib"] > 0 and "DiT" in s["sample"]["stage_s"]
    assert 0 < s["sample"]["without_vae_decode_s"] < s["sample"]["total_s"]


# =============================================================================
# kernels: `auto` takes the path bench.py gpu measured faster per chip; per-arch autotune configs. bench.py gpu: a
# failing section costs only its own figures.


def _k_rows(tri_ms, ref_ms):  # bench_attention rows: Triton and the PyTorch path, fwd + bwd times
    return [dict(shape="self", impl=i, fwd={"ms": ms}, bwd={"ms": ms})
            for i, ms in (("triton", tri_ms), ("torch", ref_ms))]


def test_kernel_auto_takes_the_measured_winner(tmp_path, monkeypatch):
    """bench.py gpu's table round-trips into `auto`: per op on a named chip the measured winner, merged with other
    chips' rows; a chip the table does not name, or no table, gets the PyTorch path."""
    pytest.importorskip("triton")
    import bench
    import vpae_kernels as kernels
    table = tmp_path / "measured.json"
    table.write_text(json.dumps({"NVIDIA A100-SXM4-80GB": {"attention": {"use": "triton", "speedup": 1.2}}}))
    monkeypatch.setattr(bench, "CUDA", True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    res = {"attention_speed": _k_rows(1.0, 1.5),  # Triton faster
           "fused_ops": [dict(op="ln_modulate", impl="triton", ms=2.0), dict(op="ln_modulate", impl="torch", ms=1.0)]}
    bench.kernel_choice(res, str(table))  # qk_norm_rope has no figures: torch
    written = json.loads(table.read_text())
    assert written["NVIDIA A100-SXM4-80GB"]["attention"]["use"] == "triton"  # kept
    assert written["NVIDIA H100 80GB HBM3"] == {"attention": {"use": "triton", "speedup": 1.5},
                                                "ln_modulate": {"use": "torch", "speedup": 0.5},
                                                "qk_norm_rope": {"use": "torch", "speedup": None}}
    calls = []
    monkeypatch.setattr(kernels._attention, "flash_attention", lambda *a: calls.append("attention") or a[0])
    monkeypatch.setattr(kernels._norm, "ln_modulate", lambda *a: calls.append("ln_modulate") or a[0])
    monkeypatch.setattr(kernels._qk_norm_rope, "qk_norm_rope", lambda *a: calls.append("qk_norm_rope") or a[0])
    monkeypatch.setattr(kernels, "MODE", "auto")
    monkeypatch.setattr(kernels, "MEASURED", str(table))
    x = torch.randn(1, 5, 2, 16)

    def run(chip):
        monkeypatch.setattr(kernels, "_table", None)
        monkeypatch.setattr(kernels, "_chip", lambda t: chip)  # as if x lived on that chip
        calls.clear()
        kernels.attention(x, x, x)
        kernels.ln_modulate(x.flatten(2), x[:, :1].flatten(2), x[:, :1].flatten(2), 1e-6)
        kernels.qk_norm_rope(x.flatten(2), torch.ones(32), 2, 1e-6)
        return calls
    assert run("NVIDIA H100 80GB HBM3") == ["attention"]
    assert run("NVIDIA A100-SXM4-80GB") == ["attention"]
    assert run("NVIDIA GeForce RTX 4090") == []  # not measured: torch
    monkeypatch.setattr(kernels, "MEASURED", str(tmp_path / "none.json"))
    assert run("NVIDIA H100 80GB HBM3") == []


def test_kernel_choice_refuses_a_kernel_that_failed(monkeypatch):
    """A Triton error on any shape, or a failed section, means torch, however fast the other shapes ran."""
    import bench
    written = {}
    monkeypatch.setattr(bench, "CUDA", False)
    monkeypatch.setattr(bench, "write_json", lambda obj, path: written.update(obj))
    rows = _k_rows(1.0, 1.5) + [dict(shape="self 75600", impl="triton", error="OutOfResources: shared memory")]
    choice = bench.kernel_choice({"attention_speed": rows, "fused_ops": {"error": "x"}}, "/nonexistent/m.json")
    assert choice["attention"]["use"] == choice["ln_modulate"]["use"] == "torch" and written["cpu"] == choice


def test_kernel_autotune_keys_and_configs_per_arch(monkeypatch):
    """HAS_KLENS is in every autotune key (a config tuned with k_lens is not reused without); a GPU autotunes over its
    own arch's list, which bench.py compile builds, and Hopper's adds the 8-warp 128-row forward tiles."""
    triton = pytest.importorskip("triton")
    import bench
    import vpae_kernels as kernels
    A = kernels._attention
    if not kernels.HAVE_TRITON:
        pytest.skip("no triton")
    for name in A.CONFIGS:
        assert "HAS_KLENS" in getattr(A, name).keys
    assert {(128, 64, 8, 3), (128, 128, 8, 3)} <= set(A.CONFIGS["_fwd_kernel"][90]) - set(A.CONFIGS["_fwd_kernel"][80])
    prune = A._tuning("_fwd_kernel")["prune_configs_by"]["early_config_prune"]  # at first launch: no CUDA at import
    every = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in A.CONFIGS["_fwd_kernel"][90]]
    for cap, arch in (((9, 0), 90), ((8, 0), 80), ((8, 9), 80), ((10, 0), 80)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cap=cap: cap)
        kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in prune(every, {})]
        assert kept == A.CONFIGS["_fwd_kernel"][arch], cap
    monkeypatch.undo()
    if A.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 collapses the autotune configs")
    built = set()

    def build(fn, args, kwargs, arch):
        built.add((fn.__name__, arch, *(kwargs.get(k) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))))
        return dict(regs=1, spill_st=0, spill_ld=0, smem=0, smem_max=1, mma="-")
    monkeypatch.setattr(bench, "_build", build)
    bench.compile_table(bench.compile_cases(full=False)[:1])  # one Wan-14B self-attention with k_lens
    for name, by_cap in A.CONFIGS.items():
        for arch, (cap, _) in bench.ARCHS.items():
            assert {b[2:] for b in built if b[:2] == (name, arch)} == set(by_cap[cap]), (name, arch)


def test_bench_timer_samples_slow_calls():
    """A call over 100 ms still gets n samples after an untimed warm-up (triton's do_bench takes one)."""
    import bench
    calls = []
    t = bench.timer(lambda: calls.append(time.sleep(0.11)), n=5, budget_ms=0)
    assert len(calls) == 6 and t["n"] == 5 and 110 <= t["min_ms"] <= t["ms"] <= t["max_ms"]
    assert bench.timer(lambda: None, n=1, budget_ms=5)["n"] > 1  # fast calls: more samples, up to the budget


def test_bench_models_built_in_bf16():
    """The 14B-width models are created in bf16 (on meta here): never the 61 GiB fp32 copy; the default dtype is
    put back."""
    import bench
    from model import PRESETS
    m = bench._model(PRESETS["i2v-14B"], "meta", torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32


def test_bench_gpu_sections_fail_alone_and_parts_merge(tmp_path, monkeypatch):
    """bench.py gpu: a section that raises records its error and the others' figures still land in --out, which is
    rewritten after every section; the two parts merge into one file with what was there."""
    import bench
    out = tmp_path / "gpu.json"
    out.write_text(json.dumps({"earlier": 1}))
    seen = {}

    def boom(*a):
        raise RuntimeError("boom\nsecond line")

    def distill_run(root):  # by now the sections before it are on disk
        seen.update(json.loads(out.read_text()))
        return {"steps": 4}
    monkeypatch.setattr(bench, "check_attention", boom)
    monkeypatch.setattr(bench, "bench_attention", lambda *a: _k_rows(1.0, 2.0))
    monkeypatch.setattr(bench, "bench_fused", lambda *a: [])
    monkeypatch.setattr(bench, "dit_latency", lambda *a: {"forward_ms": 1.0})
    monkeypatch.setattr(bench, "dit_memory", lambda *a: (_ for _ in ()).throw(SystemExit("exit")))
    monkeypatch.setattr(bench, "distill_run", distill_run)
    monkeypatch.setattr(bench, "sample_run", lambda *a: {"total_s": 2.0})
    for part in ("kernels", "models"):
        bench.gpu(argparse.Namespace(tiny=True, out=str(out), part=part))
    s = json.loads(out.read_text())
    assert s["earlier"] == 1 and s["attention_check"] == {"error": "RuntimeError: boom"}
    assert s["attention_speed"] and s["kernel_choice"]["attention"]["use"] == "triton"
    assert s["dit_train_memory"] == {"error": "SystemExit: exit"} and s["dit_forward"] == {"forward_ms": 1.0}
    assert s["distill"] == {"steps": 4} and s["sample"] == {"total_s": 2.0}
    assert seen["dit_forward"] == {"forward_ms": 1.0} and "distill" not in seen
    assert set(s["section_s"]) == {n for _, names in bench.GPU_PARTS.values() for n in names}


# =============================================================================
# sample.py in the GPU's dtypes on CPU, LoRAs merged into bf16 weights, and the bound of --offload blocks


def _s_video(monkeypatch, ckpt, image, dtype, *extra):
    """sample.main's video [3, F, H, W] fp32 in [-1, 1], before the mp4 encoder rounds it."""
    got = []
    monkeypatch.setattr(sample, "write_video", lambda video, path: got.append(video))
    args = ["--ckpt_dir", ckpt, "--prompt", "a red circle moving left", "--frames", "5", "--size", "32*32",
            "--dtype", dtype, "--out", "unused.mp4", *extra]
    sample.main(args + (["--image", image] if image else []))
    return got[0]


@pytest.mark.parametrize("kind, extra", [("i2v", ()), ("i2v", ("--teacher", "--steps", "2")),
                                         ("i2v", ("--steps", "2", "--offload", "blocks")), ("t2v", ())])
def test_sample_bf16_close_to_fp32(kind, extra, i2v_ckpt, t2v_ckpt, image, monkeypatch, tmp_path):
    # bf16 (DiT, umT5), fp16 (CLIP): finite, not constant, and near the fp32 video. Measured on the tiny
    # checkpoints over seeds 0-3, I2V and T2V, 1 and 4 steps, student and teacher: relative L2 distance
    # 0.002-0.004 at one step, up to 0.0075 at four (bf16 keeps 8 bits: 0.4% per rounding); asserted < 0.02.
    # The lower bound 1e-4 shows bf16 really ran: an fp32 run would give 0.
    monkeypatch.chdir(tmp_path)
    ckpt, img = (i2v_ckpt, image) if kind == "i2v" else (t2v_ckpt, None)
    want, got = (_s_video(monkeypatch, ckpt, img, dt, *extra) for dt in ("fp32", "bf16"))
    assert got.dtype == torch.float32 and got.isfinite().all() and got.std() > 0.1
    assert 1e-4 < (got - want).norm() / want.norm() < 0.02


def test_sample_bf16_two_ranks_equals_one(i2v_ckpt, image, tmp_path):
    # Ulysses over 2 gloo ranks in bf16, blocks streamed: the video of one process (measured: identical frames;
    # the bf16 run differs from the fp32 one by 1.6 per pixel on average, so 0.2 would catch ranks left in fp32)
    args = ["--ckpt_dir", i2v_ckpt, "--image", image, "--frames", "5", "--size", "32*32", "--dtype", "bf16"]
    one = read_mp4(sample.main(args + ["--out", str(tmp_path / "one.mp4")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(HERE, "sample.py"), *args, "--offload", "blocks", "--out", str(tmp_path / "two.mp4")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert np.abs(read_mp4(str(tmp_path / "two.mp4")).astype(int) - one).mean() < 0.2


def test_dtypes_default_and_flag():
    official = dict(dit=torch.bfloat16, t5=torch.bfloat16, clip=torch.float16, vae=torch.float32)
    fp32 = dict.fromkeys(official, torch.float32)
    assert sample.dtypes("cuda") == sample.dtypes("cpu", "bf16") == sample.dtypes("cuda:1", "bf16") == official
    assert sample.dtypes("cpu") == sample.dtypes("cuda", "fp32") == fp32
    assert sample.get_parser().parse_args([]).dtype is None  # None: the device decides
    with pytest.raises(SystemExit):
        sample.get_parser().parse_args(["--dtype", "fp16"])


def test_lora_merged_into_bf16_weights(i2v_ckpt, lora_run):
    # A small update (0.003 x the student's delta: about a quarter of a bf16 step of the weights) must reach a bf16
    # DiT as the fp32 merge does, cast to bf16 once. Merged into weights already in bf16, most elements round back
    # to where they were: that kept 0.50 of this update (its projection on the true one) where this keeps 1.03.
    run, _ = lora_run
    lora = [(lora_file(run, 64), 0.003)]
    got = sample.load_dit(i2v_ckpt, torch.bfloat16, "cpu", loras=lora).state_dict()
    want = sample.load_dit(i2v_ckpt, torch.float32, "cpu", loras=lora).state_dict()
    for k, v in got.items():
        assert torch.equal(v, want[k].to(v.dtype)), k  # bitwise: one rounding, of the fp32 sum
    base, base32 = (WanModel.from_pretrained(i2v_ckpt, dt).state_dict() for dt in (torch.bfloat16, torch.float32))
    w = "blocks.0.ffn.0.weight"
    d = want[w] - base32[w]  # the true update
    kept = ((got[w].float() - base[w].float()) * d).sum() / d.square().sum()
    assert got[w].dtype == torch.bfloat16 and 0.9 < kept < 1.1


class _SStream:
    """A fake CUDA stream: record_event and wait_event write to a shared log; events log their synchronize."""

    def __init__(self, log, name):
        self.log, self.name, self.n = log, name, 0

    def record_event(self):
        e = _SEvent(self.log, f"{self.name}{self.n}")
        self.n += 1
        self.log.append(e.name)
        return e

    def wait_event(self, e):
        self.log.append(f"wait {e.name}")


class _SEvent:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(f"sync {self.name}")


def test_offload_blocks_at_most_two_blocks_on_the_device():
    cfg = tiny_cfg("i2v", num_layers=4)
    m = random_model(cfg)
    x, t, ctx, kw = inputs(cfg)
    log = []
    with torch.no_grad():
        want = m(x, t, ctx, **kw)
        stream = sample.BlockStream(m, "cpu", streams=(_SStream(log, "copy"), _SStream(log, "done")))
        buffers = []  # at each block's start: how many buffers its parameters view (one: the block's copy)
        for b in m.blocks:
            b.register_forward_pre_hook(lambda mod, a: buffers.append(
                len({p.untyped_storage().data_ptr() for p in mod.parameters()})))
        for _ in range(2):
            assert torch.equal(m(x, t, ctx, **kw), want)
    assert buffers == [1] * 8 and all(buf.dtype == torch.uint8 for buf, _ in stream.home)
    # copyK: the K-th copy is queued (block K % 4); doneK: block K finished on the compute stream. Block i runs after
    # its copy (wait), and the host queues block i+1's copy only after block i-1 finished (sync), so its memory is free
    assert log[:16] == ["copy0", "wait copy0", "copy1", "done0",
                        "wait copy1", "sync done0", "copy2", "done1",
                        "wait copy2", "sync done1", "copy3", "done2",
                        "wait copy3", "done3",
                        "sync done3", "copy4"]  # the next call: block 0 waits for the last block
    finished = 0  # blocks known finished; at every copy, the blocks copied and not known finished are at most 2
    for i, s in enumerate(log):
        if s.startswith("sync done"):
            finished = max(finished, int(s[9:]) + 1)
        if s.startswith("copy"):
            assert int(s[4:]) + 1 - finished <= 2, log[:i + 1]


# =============================================================================
# video folders as people have them (issue 29)


def _d_clip(frames, h, w):
    """uint8 [F, H, W, 3]: a bright top half over a dark bottom half, and a grey bar moving right."""
    x = np.full((frames, h, w, 3), 30, np.uint8)
    x[:, :h // 2] = 220
    for t in range(frames):
        x[t, :, 2 * t % w] = 128
    return x


def _d_ffmpeg(path, clip, fps, *args, before=()):
    """Encode clip with the bundled ffmpeg: `before` are options of the piped input, `args` go after it (another
    input, the output options; none: the container's default codec)."""
    h, w = clip.shape[1:3]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *before, "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", *args, str(path)]
    r = subprocess.run(cmd, input=np.ascontiguousarray(clip).tobytes(), capture_output=True)
    assert r.returncode == 0, r.stderr.decode()


@pytest.fixture(scope="module")
def _d_videos(tmp_path_factory):
    """The folder of issue 29, small: 10 videos, 9 of them captioned, and 2 files that are not videos."""
    root = tmp_path_factory.mktemp("folder")
    land, portrait = _d_clip(20, 48, 64), _d_clip(20, 64, 48)
    x264 = ("-c:v", "libx264", "-pix_fmt", "yuv420p")
    _d_ffmpeg(root / "portrait.mp4", portrait, 30, "-f", "lavfi", "-i", "sine=duration=1", "-shortest", *x264)
    _d_ffmpeg(root / "hevc.mp4", land, 60, "-c:v", "libx265", "-pix_fmt", "yuv420p10le")  # 20 frames at 60 fps
    _d_ffmpeg(root / "av1.mkv", land, 24, "-c:v", "libsvtav1", "-preset", "12", "-pix_fmt", "yuv420p")
    # a phone's portrait clip: stored landscape (the portrait turned clockwise), shown turned back by the metadata
    _d_ffmpeg(root / "phone.mov", np.rot90(portrait, -1, (1, 2)), 30, *x264,
              before=("-noautorotate", "-display_rotation", "90"))  # 90 degrees counter-clockwise when displayed
    _d_ffmpeg(root / "old.avi", land[:3], 25, "-c:v", "mpeg4")  # 3 frames
    _d_ffmpeg(root / "anim.gif", land, 10)
    _d_ffmpeg(root / "plain.mp4", land, 16, *x264)
    _d_ffmpeg(root / "extra.webm", land, 16, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-pix_fmt", "yuv420p")
    (root / "empty.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes((root / "plain.mp4").read_bytes()[:1000])
    (root / "notes.md").write_text("shot on a phone\n")
    (root / "cover.jpg").write_bytes(b"\xff\xd8\xff")
    for f in os.listdir(root):  # a .txt caption beside each video but extra.webm
        if f.endswith(data.VIDEO_EXTS) and f != "extra.webm":
            (root / f).with_suffix(".txt").write_text("a cat\n")
    return str(root)


def test_every_file_of_a_video_folder_is_encoded_skipped_or_ignored(t2v_ckpt, _d_videos, tmp_path, capsys,
                                                                     monkeypatch):
    read = data.read_frames

    def noisy(path, frames):  # the reader warns twice, by log and by warnings: said once, on the clip's own line
        if path.endswith("plain.mp4"):
            for _ in range(2):
                logging.getLogger("imageio_ffmpeg").warning("odd timestamps")
                warnings.warn("odd stream")
        return read(path, frames)

    monkeypatch.setattr(data, "read_frames", noisy)
    videos, out = shutil.copytree(_d_videos, tmp_path / "videos"), str(tmp_path / "lat")
    args = ["--ckpt_dir", t2v_ckpt, "--videos", str(videos), "--out", out, "--frames", "5", "--size", "16*16"]
    data.main(args)
    cap = capsys.readouterr()
    log = cap.out + cap.err
    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    assert sorted(c["file"] for c in man["clips"]) == ["anim.gif", "av1.mkv", "hevc.mp4", "phone.mov", "plain.mp4",
                                                       "portrait.mp4"]
    assert man["skipped"] == {"no_caption": ["extra.webm"], "too_short": ["old.avi"],
                              "unreadable": ["empty.mp4", "truncated.mp4"]}
    assert "ignored 2 file(s) that are not videos or captions: cover.jpg, notes.md\n" in log
    assert "skipped 1 video(s) that have no caption: extra.webm\n" in log
    assert "[5/9] old.avi: skipped, too_short (3 frames at 25 fps; 5 frames at 16 fps need 7)\n" in log
    assert all(f in log for f in os.listdir(_d_videos) if not f.endswith(".txt"))  # every file named
    assert "frame size" not in log  # the rotated clip's warning is dropped: harmless
    assert [line.split(": ", 1)[0] for line in log.splitlines() if "odd" in line] == ["[7/9] plain.mp4"]
    assert log.count("odd timestamps") == log.count("odd stream") == 1
    assert "Traceback" not in log
    (videos / "extra.txt").write_text("a cat\n")  # captioned after the run: the next run encodes it
    data.main(args)
    assert "1 clips to encode" in capsys.readouterr().out
    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    assert len(man["clips"]) == 7 and "no_caption" not in man["skipped"]


def test_rotated_and_portrait_clips_arrive_as_displayed(_d_videos):
    for name in ("phone.mov", "portrait.mp4"):
        x = data.read_frames(os.path.join(_d_videos, name), 5).astype(float)
        assert x.shape == (5, 64, 48, 3)
        assert x[:, :24].mean() > x[:, 40:].mean() + 100  # the bright half on top


def test_list_clips_with_captions_jsonl_names_the_uncaptioned_and_the_ignored(tmp_path):
    for f in ("a.mp4", "a.txt", "b.MOV", "sub/c.mkv", "notes.md"):
        os.makedirs((tmp_path / f).parent, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.mp4", "caption": "a cat"}) + "\n")
    assert data.list_clips(str(tmp_path)) == ([("a.mp4", "a cat")], ["b.MOV", "sub/c.mkv"], ["notes.md"])


def test_every_video_extension_reads(tmp_path):
    assert {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif"} <= set(data.VIDEO_EXTS)
    for ext in data.VIDEO_EXTS:  # each written with its container's default codec (.wmv: MS-MPEG4, .3gp: H.263, ...)
        _d_ffmpeg(tmp_path / f"a{ext}", _d_clip(12, 96, 128), 25)  # 96x128 fits H.263; 25 fps fits MPEG-1
        assert data.read_frames(str(tmp_path / f"a{ext}"), 5).shape == (5, 96, 128, 3), ext


# ---- issue 27's small things: an empty video folder, bench.py --help


@pytest.fixture(scope="module")
def config_only_ckpt(tmp_path_factory):
    """A checkpoint folder with only its config.json: an empty video folder must be refused before any weight or
    encoder is read."""
    full = make_tiny_checkpoint(tmp_path_factory.mktemp("t2v"), "t2v")
    path = tmp_path_factory.mktemp("cfg")
    (path / "config.json").write_text(open(os.path.join(full, "config.json")).read())
    return str(path)


def test_empty_video_folder_is_refused_before_out_is_made(config_only_ckpt, tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "run" / "latents"
    empty.mkdir()
    with pytest.raises(data.NoClips) as e:  # a ValueError: what distill.py and data.py catch
        data.precompute(config_only_ckpt, str(empty) + "/", str(out))
    msg = str(e.value)
    assert msg.startswith(f"no videos in {empty}/ (looked for .mp4, .mov,") and "\n" not in msg
    assert isinstance(e.value, ValueError) and "frames" not in msg
    assert not out.exists() and not out.parent.exists()
    (empty / "notes.md").write_text("x")  # files that are not videos are named
    with pytest.raises(data.NoClips, match=r"; found only notes.md: pass a folder"):
        data.precompute(config_only_ckpt, str(empty), str(out))
    assert not out.parent.exists()
    # data.py's own command line: one line, no output folder
    with pytest.raises(SystemExit) as e:
        data.main(["--ckpt_dir", config_only_ckpt, "--videos", str(empty), "--out", str(out)])
    assert str(e.value.code).startswith(f"data.py: error: no videos in {empty} (") and "\n" not in str(e.value.code)
    assert not out.parent.exists()


def test_folder_of_uncaptioned_videos_is_refused_before_out_is_made(config_only_ckpt, tmp_path):
    videos, out = tmp_path / "v", tmp_path / "lat"
    videos.mkdir()
    for f in ("a.mp4", "b.mov"):
        (videos / f).write_bytes(b"")
    with pytest.raises(data.NoClips) as e:
        data.precompute(config_only_ckpt, str(videos), str(out))
    msg = str(e.value)
    assert msg.startswith(f"no captioned videos in {videos}: 2 video(s) have no caption (a.mp4, b.mov)")
    assert ".txt caption beside each video" in msg and not out.exists()
    (videos / "captions.jsonl").write_text(json.dumps({"file": "a.mp4", "caption": "a cat"}) + "\n")
    clips, uncaptioned, _ = data.list_clips(str(videos))
    assert clips == [("a.mp4", "a cat")] and uncaptioned == ["b.mov"]  # a captioned video: not refused early


def test_every_bench_flag_has_a_help_text_with_its_default():
    import bench
    p = bench.parser()
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [p] + [sp for a in subs for sp in a.choices.values()]
    for q in parsers:
        for a in q._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"{a.option_strings or a.dest} has no help"
            if a.help != argparse.SUPPRESS and a.default not in (None, False):
                assert "default" in a.help, f"{a.option_strings} does not say its default {a.default!r}"
    text = p.format_help()
    assert all(a.help == argparse.SUPPRESS or a.help.split(" (")[0] in " ".join(text.split()) for a in p._actions)
