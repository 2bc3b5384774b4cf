"""vpae tests: tiny configs, random weights in the official file formats, CPU, seconds."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model as M

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
# An independent Wan forward, written op by op from spec section 1 in the official style
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
    assert "missing: blocks.1.cross_attn.k_img.weight" in msg and "unexpected: extra.weight" in msg
    assert "blocks.0.ffn.0.bias (5,) != (96,)" in msg

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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
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
    rng = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, 4, 5, 6)
    d = distill.str1_delta(x, 0.0, 0.1, rng)  # temporal part alone: constant over H and W, varies over frames
    assert torch.equal(d, d[..., :1, :1].expand_as(d)) and d[0, 0, 0, 0, 0] != d[0, 0, 1, 0, 0]
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
    x0 = torch.randn(x.shape, generator=g)
    assert torch.isclose(distill.csds_loss(x0, target), ((x0 - target) ** 2).mean())


def test_ema_update():
    import distill
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expect = [0.995 * pa.detach() + 0.005 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    distill.ema_update(a, b, 0.995)
    assert all(torch.allclose(e, p) for e, p in zip(expect, a.parameters()))


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
    rng = torch.Generator().manual_seed(0)
    distill.phase2_d_step(c, m, batch, rng)
    assert all(p.grad is None for p in gen.parameters()) and all(p.grad is not None for p in disc.parameters())
    distill.phase2_g_step(c, m, batch, rng)
    assert all(p.grad is None for p in ema.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.blocks[0].parameters())


if __name__ == "__main__" and sys.argv[1] == "sp":
    sp_worker(sys.argv[2])
