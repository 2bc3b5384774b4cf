"""Measurements. Every figure printed here is measured in this run; compare ratios, not absolute times on CPU.

  python bench.py dit [--dim 1536 --heads 12 --layers 4 --frames 9 --size 416*240 --reps 3]
      DiT forward time and peak memory, vpae beside diffusers' WanTransformer3DModel when it is installed
      (same config, random weights, fp32 on CPU / bf16 on GPU), each in its own process, alternating.
  python bench.py memory [--preset i2v-14B --world 8 --sp 8 --frames 81 --size 832*480]
      distill.py's per-GPU memory estimate for a preset, from models built on the meta device.
  python bench.py train-memory [--dim 768 --heads 6 --layers 8 --frames 9 --size 256*256]
      Runs distill.py on 2 CPU ranks (gloo) on a random checkpoint of that size and random latents, and prints
      the peak RSS per rank it logs beside the estimate it printed at start.
  python bench.py kernels [--tiny]
      On a GPU: bf16 attention fwd/bwd checked against fp64 beside SDPA's own bf16 error; attention TFLOP/s at
      Wan shapes beside SDPA cuDNN and flash; GB/s of the fused norm ops against a copy of the same bytes; one
      DiT forward at 14B width, 480p x 81 frames. --tiny: the same code at tiny sizes on CPU, interpreted.
  python bench.py load CKPT_DIR
      Peak RSS while loading an official checkpoint and touching every weight, against its size.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def timer(fn, grad_to_none=None):
    """Milliseconds per call: the median of triton's do_bench on a GPU, one timed call on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _kernels():
    import kernels
    return kernels._attention, kernels._norm, kernels._qk_norm_rope


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):  # q, k, v [B, L, H, D] as the model holds them; SDPA sees transposed views
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return o.transpose(1, 2)
    return run


def check_attention(dev, dt, tiny):
    """Max abs error of the Triton kernel and of SDPA in the same dtype, both against fp64, fwd and bwd."""
    A = _kernels()[0]
    cases = [(2, 2, 33, 33, 64, [33, 20]), (1, 2, 20, 9, 80, None)] if tiny else \
        [(2, 8, 1000, 1000, 128, [1000, 613]), (2, 8, 1000, 257, 128, None), (1, 16, 257, 257, 80, None),
         (2, 4, 777, 512, 64, [512, 100])]
    print(f"attention correctness ({dt}, error vs fp64; 'sdpa' = PyTorch SDPA in the same dtype)")
    for B, H, Lq, Lk, D, kl in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        qkv = [torch.randn(B, L, H, D, generator=g, device=dev) for L in (Lq, Lk, Lk)]
        do = torch.randn(B, Lq, H, D, generator=g, device=dev)
        k_lens = torch.tensor(kl, device=dev) if kl else None
        res = {}
        for name, fn, cast in (("ref", A.attention_ref, torch.float64), ("triton", A.flash_attention, dt),
                               ("sdpa", A.attention_ref, dt)):
            ins = [t.to(cast).requires_grad_() for t in qkv]
            o = fn(*ins, k_lens)
            res[name] = [o.double()] + [t.double() for t in torch.autograd.grad(o, ins, do.to(cast))]
        err = {n: [(a - b).abs().max().item() for a, b in zip(res[n], res["ref"])] for n in ("triton", "sdpa")}
        print(f"  B={B} H={H} Lq={Lq} Lk={Lk} D={D} k_lens={kl}: " + "  ".join(
            f"{n} o/dq/dk/dv " + "/".join(f"{e:.1e}" for e in err[n]) for n in err))
        for et, es in zip(err["triton"], err["sdpa"]):
            assert math.isfinite(et) and et <= 2 * (es if math.isfinite(es) else 0) + 1e-2, "less accurate than SDPA"


def bench_attention(dev, dt, tiny):
    """TFLOP/s forward and backward: Triton beside SDPA's cuDNN and flash backends (FLOPs = 4 B H Lq Lk D fwd)."""
    from torch.nn.attention import SDPBackend
    A = _kernels()[0]
    shapes = [("self", 1, 2, 40, 40, 64), ("cross", 1, 2, 40, 12, 64)] if tiny else \
        [("self 32760", 1, 40, 32760, 32760, 128), ("self 75600", 1, 40, 75600, 75600, 128),
         ("cross 32760x512", 1, 40, 32760, 512, 128)]
    impls = [("triton", A.flash_attention)] + ([("sdpa-math", _sdpa(SDPBackend.MATH))] if dev == "cpu" else
                                               [("sdpa-cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION)),
                                                ("sdpa-flash", _sdpa(SDPBackend.FLASH_ATTENTION))])
    print(f"attention speed ({dt}, {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu interpreter'})")
    for name, B, H, Lq, Lk, D in shapes:
        q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dt, requires_grad=True) for L in (Lq, Lk, Lk))
        flops = 4 * B * H * Lq * Lk * D
        for impl, fn in impls:
            try:
                with torch.no_grad():
                    ms_f = timer(lambda: fn(q, k, v))
                o = fn(q, k, v)
                do = torch.randn_like(o)
                ms_b = timer(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v])
            except RuntimeError as e:  # e.g. a backend that does not take this shape on this GPU
                print(f"  {name:16s} {impl:11s} n/a: {str(e).splitlines()[0][:100]}")
                continue
            print(f"  {name:16s} {impl:11s} fwd {ms_f:9.2f} ms {flops / ms_f / 1e9:7.1f} TFLOP/s   "
                  f"bwd {ms_b:9.2f} ms {2.5 * flops / ms_b / 1e9:7.1f} TFLOP/s")
            del o, do
        del q, k, v


def bench_fused(dev, tiny):
    """GB/s of the fused norm ops (fwd and bwd, the [B, L, D] tensors they must read and write) against a
    clone of the same number of bytes."""
    _, N, R = _kernels()
    D, H = (64, 4) if tiny else (5120, 40)
    print(f"fused ops bandwidth (D={D}; copy = clone() moving the same bytes)")
    for L in ((16,) if tiny else (32760, 75600)):
        x32 = torch.randn(1, L, D, device=dev, requires_grad=True)
        xb = torch.randn(1, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        e = torch.randn(1, 2, D, device=dev, requires_grad=True)
        w = torch.randn(D, device=dev, requires_grad=True)
        ang = torch.rand(L, D // H // 2, device=dev)
        cos, sin = ang.cos(), ang.sin()
        ops = [  # name, run, bytes fwd (x in, y out), bytes bwd (x, dy in, dx out)
            ("ln_modulate fp32->bf16", lambda: N.ln_modulate(x32, *e.chunk(2, dim=1), 1e-6, torch.bfloat16),
             L * D * (4 + 2), L * D * (4 + 2 + 4), [x32, e]),
            ("qk_norm_rope bf16", lambda: R.qk_norm_rope(xb, w, H, 1e-6, cos, sin),
             L * D * (2 + 2) + 2 * cos.numel() * 4, L * D * (2 + 2 + 2) + 2 * cos.numel() * 4, [xb, w]),
        ]
        for name, fn, b_f, b_b, leaves in ops:
            with torch.no_grad():
                ms_f = timer(fn)
            y = fn()
            dy = torch.randn_like(y)
            ms_b = timer(lambda: y.backward(dy, retain_graph=True), grad_to_none=leaves)
            line = []
            for tag, ms, nbytes in (("fwd", ms_f, b_f), ("bwd", ms_b, b_b)):
                buf = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
                ms_c = timer(lambda: buf.clone())
                line.append(f"{tag} {nbytes / ms / 1e6:7.0f} GB/s (copy {nbytes / ms_c / 1e6:7.0f}, "
                            f"{ms_c / ms:4.0%} of it)")
            print(f"  L={L:6d} {name:24s} " + "   ".join(line))


def dit_latency(dev, tiny):
    """One DiT forward at 14B width (random bf16 weights, 480p x 81 frames), and what 1 step and 50 CFG steps cost."""
    from model import PRESETS, WanConfig, WanModel
    cfg = WanConfig("i2v", in_dim=36, dim=64, ffn_dim=128, num_heads=4, num_layers=2) if tiny else PRESETS["i2v-14B"]
    F_, H, W = (2, 4, 4) if tiny else (21, 60, 104)  # latent of 81 frames at 832x480
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        m = WanModel(cfg).to(dt).eval()
        x, y = torch.randn(1, 16, F_, H, W), torch.randn(1, 20, F_, H, W)
        ctx, clip = torch.randn(1, 512, cfg.text_dim), torch.randn(1, 257, cfg.clip_dim)
        t = torch.tensor([999])
    with torch.no_grad():
        ms = timer(lambda: m(x, t, ctx, clip, y))
    print(f"DiT forward, {'tiny' if tiny else 'i2v-14B'} width, {F_ * H * W // 4} tokens, {dt}: {ms:.1f} ms per NFE; "
          f"1 step (1 NFE) {ms / 1e3:.2f} s vs 50 steps with CFG (100 NFE, from the per-NFE time) {ms / 10:.1f} s")


def kernels_bench(tiny):
    """The whole GPU measurement; tiny: the same code at tiny sizes on CPU under TRITON_INTERPRET=1."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not (tiny and os.environ.get("TRITON_INTERPRET") == "1"):
        raise SystemExit("bench.py kernels needs a CUDA GPU; --tiny runs it on CPU under the Triton interpreter")
    dt = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter's bf16 dot is broken
    check_attention(dev, dt, tiny)
    bench_attention(dev, dt, tiny)
    bench_fused(dev, tiny)
    dit_latency(dev, tiny)


# -----------------------------------------------------------------------------
# compile: every Triton kernel and autotune config built ahead of time for Hopper and Ampere, no GPU needed

ARCHS = {"sm_90a": (90, 232448), "sm_80": (80, 166912)}  # capability, shared memory a block may use (bytes)


def compile_cases(full=True):
    """The kernel launches of one Wan-14B block at 480p x 81 (32,760 tokens, 40 heads of 128, width 5120, bf16),
    as (name, function that makes them) on meta tensors; `full` adds the cross-attention and head-dim-80 cases."""
    A, N, R = _kernels()
    L, H, D, Wd = 32760, 40, 128, 5120

    def attn(Lq, Lk, h, d, k_lens):
        def run():
            q = torch.empty(1, Lq, h, d, device="meta", dtype=torch.bfloat16)
            k = torch.empty(1, Lk, h, d, device="meta", dtype=torch.bfloat16)
            kl = torch.full((1,), Lk, device="meta", dtype=torch.int32) if k_lens else None
            o, lse = A._flash_fwd(q, k, k, kl)
            A._flash_bwd(o, q, k, k, o, lse, kl)
        return run

    def fused(rope):
        def run():
            x = torch.empty(1, L, Wd, device="meta", requires_grad=True)
            e = torch.empty(1, 1, Wd, device="meta", requires_grad=True)
            N.ln_modulate(x, e, e, 1e-6, torch.bfloat16).backward(torch.empty(1, L, Wd, device="meta", dtype=torch.bfloat16))
            xb = torch.empty(1, L, Wd, device="meta", dtype=torch.bfloat16, requires_grad=True)
            cs = torch.empty(L, D // 2, device="meta") if rope else None
            y = R.qk_norm_rope(xb, torch.empty(Wd, device="meta", dtype=torch.bfloat16), H, 1e-6, cs, cs)
            y.backward(torch.empty_like(y))
        return run

    cases = [("self-attn sp k_lens", attn(L, L, H, D, True)), ("fused ops w5120", fused(True))]
    return cases + [("self-attn", attn(L, L, H, D, False)), ("cross text 512", attn(L, 512, H, D, False)),
                    ("cross image 257", attn(L, 257, H, D, False)), ("head dim 80", attn(257, 257, 16, 80, False)),
                    ("fused ops no rope", fused(False))] * full


def _launches(run):
    """The Triton launches `run` makes, recorded instead of run: [(kernel, args, kwargs)]."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    ks = [k for m in _kernels() for k in vars(m).values() if isinstance(k, (Autotuner, JITFunction))]
    calls = []
    for k in ks:
        k.run = lambda *a, grid, warmup, _k=k, **kw: calls.append((_k, a, kw))
    try:
        run()
    finally:
        for k in ks:
            del k.run
    return calls


def _build(fn, args, kwargs, arch):
    """One launch built to cubin for `arch` as triton's launcher would specialize it: (cache key, ptxas's report)."""
    import contextlib
    import io
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    cap, smem_max = ARCHS[arch]
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas's -v report, printed when dump_ptxas_log is on
        out = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__)
    num = lambda pat: sum(int(n) for n in re.findall(pat, log.getvalue()))  # noqa: E731
    ptx = out.asm["ptx"]
    return dict(regs=num(r"Used (\d+) registers"), spill_st=num(r"(\d+) bytes spill stores"),
                spill_ld=num(r"(\d+) bytes spill loads"), smem=out.metadata.shared, smem_max=smem_max,
                mma="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "-")


def compile_table(cases, archs=tuple(ARCHS)):
    """Every distinct (kernel, specialization, autotune config, arch) among the cases' launches, built to cubin
    with what ptxas reports: one dict per build."""
    import triton
    rows, seen = [], set()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = True, True  # ptxas runs, talks
        for case, run in cases:
            for k, args, kw in _launches(run):
                fn = k.fn if hasattr(k, "configs") else k  # an Autotuner wraps the JITFunction; a kernel per config
                for c in [c.all_kwargs() for c in k.configs] if hasattr(k, "configs") else [{}]:
                    kwargs = {**kw, **c}
                    name = f"{fn.__module__.split('.')[-1]}.{fn.__name__}"
                    config = (f"{c['BLOCK_M']}x{c['BLOCK_N']} " if c else "") + \
                        f"w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"  # triton's defaults: 4, 3
                    key = (name, config, repr([a for a in args if not isinstance(a, torch.Tensor)]), repr(kw))
                    for arch in archs:
                        if (key, arch) not in seen:
                            seen.add((key, arch))
                            t0 = time.perf_counter()
                            r = _build(fn, args, kwargs, arch)
                            rows.append(dict(case=case, kernel=name, config=config, arch=arch,
                                             s=time.perf_counter() - t0, **r))
    return rows


def compile_report(full):
    rows = compile_table(compile_cases(full))
    print("Triton kernels compiled ahead of time with the ptxas in the triton wheel (no GPU); config = "
          "BLOCK_M,BLOCK_N,warps,stages; smem = shared memory the kernel asks for, limit in brackets")
    print(f"{'case':20s} {'kernel':32s} {'config':12s} {'arch':7s} {'regs':>4s} {'spill st/ld B':>13s} "
          f"{'smem KiB':>13s} {'mma':>5s} {'s':>5s}")
    for r in rows:
        print(f"{r['case']:20s} {r['kernel']:32s} {r['config']:12s} {r['arch']:7s} {r['regs']:4d} "
              f"{r['spill_st']:6d}/{r['spill_ld']:<6d} {r['smem'] / 1024:5.0f} ({r['smem_max'] // 1024:3d}) "
              f"{r['mma']:>5s} {r['s']:5.1f}")
    bad = [r for r in rows if r["spill_st"] or r["spill_ld"] or r["smem"] > r["smem_max"]]
    print(f"{len(rows)} kernels compiled, {len(bad)} spill or overflow shared memory")


def rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)


def load(ckpt, dtype=None):
    from model import WanModel, weight_files
    size = sum(os.path.getsize(f) for f in weight_files(ckpt))
    before = rss_peak()
    t0 = time.perf_counter()
    m = WanModel.from_pretrained(ckpt, dtype=dtype)
    touched = sum(p.float().sum().item() for p in m.parameters())  # read every page of every weight
    dt = time.perf_counter() - t0
    peak = rss_peak() - before
    print(f"checkpoint {size / 2**20:.0f} MiB, load+touch {dt:.2f} s, peak RSS over baseline {peak / 2**20:.0f} MiB, "
          f"peak/size={peak / size:.3f}, dtype {dtype or 'as stored'} (checksum {touched:.3e})")


def memory(a):
    import types
    from distill import Config, add_lora, memory_estimate, print_memory
    from model import PRESETS, Discriminator, WanModel
    cfg = Config(sp=a.sp)
    with torch.device("meta"):
        gen, teacher = WanModel(PRESETS[a.preset]), WanModel(PRESETS[a.preset])
        add_lora(teacher, cfg.lora_rank)
        disc = Discriminator(gen.cfg.dim, range(cfg.disc_taps), cfg.disc_width, cfg.disc_queries, cfg.semantic)
    W, H = map(int, a.size.split("*"))
    tokens = ((a.frames - 1) // 4 + 1) * (H // 16) * (W // 16)
    print(f"{a.preset} distillation, Phase II (the larger), {a.frames} frames at {a.size} = {tokens} tokens, "
          f"world {a.world}, sp {a.sp}, micro-batch 1, the default Config")
    print_memory(memory_estimate(cfg, types.SimpleNamespace(gen=gen, teacher=teacher, disc=disc), a.world, tokens))


def train_memory(a):
    import tempfile
    from safetensors.torch import save_file
    from model import WanConfig, WanModel
    root = tempfile.mkdtemp(prefix="vpae-mem-")
    cfg = WanConfig("t2v", dim=a.dim, ffn_dim=4 * a.dim, num_heads=a.heads, num_layers=a.layers, text_len=64)
    ckpt, lat = os.path.join(root, "ckpt"), os.path.join(root, "latents")
    os.makedirs(ckpt), os.makedirs(lat)
    save_file({k: v.contiguous() for k, v in WanModel(cfg).state_dict().items()},
              os.path.join(ckpt, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump({"model_type": "t2v", "dim": a.dim, "ffn_dim": 4 * a.dim, "num_heads": a.heads,
                   "num_layers": a.layers, "text_len": 64}, f)
    W, H = map(int, a.size.split("*"))
    shape = (16, (a.frames - 1) // 4 + 1, H // 8, W // 8)
    clips = [{"id": f"{i:06d}", "shard": "shard_00000.safetensors", "caption": "x", "file": f"{i}.mp4"} for i in range(4)]
    save_file({f"{c['id']}.{k}": torch.randn(*s) for c in clips for k, s in (("latent", shape), ("context", (20, 4096)))},
              os.path.join(lat, "shard_00000.safetensors"))
    save_file({"context": torch.randn(20, 4096)}, os.path.join(lat, "neg_context.safetensors"))
    with open(os.path.join(lat, "manifest.json"), "w") as f:
        json.dump({"model_type": "t2v", "frames": a.frames, "size": a.size, "clips": clips, "skipped": {}}, f)
    out = os.path.join(root, "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill.py"), f"--teacher={ckpt}",
           f"--data={lat}", f"--out={out}", "--phase1_steps=1", "--phase2_steps=2", "--batch_size=2",
           "--log_every=1", "--ckpt_every=1000", "--sp=2"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    est = float(text.split("memory per GPU  total")[1].split()[0])
    with open(os.path.join(out, "log.jsonl")) as f:
        peak = max(json.loads(line)["peak_mem_gib"] for line in f)
    print([line for line in text.splitlines() if "memory per GPU" in line or "tokens per clip" in line], sep="\n")
    print(f"2 CPU ranks, sp 2, dim {a.dim}, {a.layers} layers: estimate {est:.2f} GiB per rank, "
          f"measured peak RSS {peak:.2f} GiB per rank (RSS includes the ~0.4 GiB of the Python/torch process)")


def dit_child(a):
    """One implementation in this process: prints a json line with the median time and the peak memory."""
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    W, H = map(int, a.size.split("*"))
    F_ = (a.frames - 1) // 4 + 1
    x = torch.randn(1, 16, F_, H // 8, W // 8, device=dev)
    t = torch.tensor([500], device=dev)
    ctx = torch.randn(1, 512, 4096, device=dev)
    with torch.device(dev):
        if a.impl == "vpae":
            from model import WanConfig, WanModel
            m = WanModel(WanConfig("t2v", dim=a.dim, ffn_dim=a.ffn, num_heads=a.heads, num_layers=a.layers)).to(dt)
            run = lambda: m(x, t, ctx)
        else:
            from diffusers import WanTransformer3DModel
            m = WanTransformer3DModel(num_attention_heads=a.heads, attention_head_dim=a.dim // a.heads, in_channels=16,
                                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=a.ffn, num_layers=a.layers,
                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).to(dt)
            run = lambda: m(x.to(dt), t, ctx.to(dt), return_dict=False)[0]
    m.eval()
    base = torch.cuda.max_memory_allocated() if cuda else rss_peak()
    times = []
    with torch.no_grad():
        for _ in range(a.reps + 1):  # the first call warms up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_peak()) - base
    times = sorted(times[1:])
    print(json.dumps({"impl": a.impl, "median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1],
                      "peak_mib": peak / 2**20, "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "tokens": F_ * (H // 16) * (W // 16)}))


def dit(a):
    impls = ["vpae"]
    try:
        import diffusers  # noqa: F401
        impls.append("diffusers")
    except ImportError:
        print("diffusers is not installed: timing vpae alone (pip install diffusers to compare)")
    rows = []
    for r in range(a.rounds):  # alternate the implementations so drift in machine load hits both
        for impl in impls:
            cmd = [sys.executable, __file__, "dit", "--child", "--impl", impl] + [
                f"--{k}={getattr(a, k)}" for k in ("dim", "ffn", "heads", "layers", "frames", "size", "reps")]
            rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
    print(f"DiT forward, dim {a.dim}, {a.layers} layers, {a.heads} heads, {a.frames} frames at {a.size} "
          f"({rows[0]['tokens']} tokens), device {rows[0]['device']}, {a.reps} timed reps x {a.rounds} rounds")
    print(f"{'impl':10s} {'round':>5s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'peak MiB':>9s}")
    for i, r in enumerate(rows):
        print(f"{r['impl']:10s} {i // len(impls):5d} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} {r['peak_mib']:9.0f}")
    if len(impls) == 2:
        med = lambda name: sorted(r["median_s"] for r in rows if r["impl"] == name)[a.rounds // 2]
        print(f"vpae / diffusers time ratio (median of rounds): {med('vpae') / med('diffusers'):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dit", "load", "memory", "train-memory", "kernels", "compile"])
    p.add_argument("ckpt", nargs="?", help="checkpoint directory (load)")
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--ffn", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--frames", type=int, default=None, help="default 9 (dit), 81 (memory)")
    p.add_argument("--size", default=None, help="W*H in pixels; default 416*240 (dit), 832*480 (memory)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--impl", default="vpae")
    p.add_argument("--preset", default="i2v-14B")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--sp", type=int, default=8)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="load: convert to this dtype while loading")
    p.add_argument("--tiny", action="store_true", help="kernels: tiny sizes on CPU under the Triton interpreter")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.frames = a.frames or (81 if a.what == "memory" else 9)
    a.size = a.size or {"memory": "832*480", "train-memory": "256*256"}.get(a.what, "416*240")
    if a.what == "load":
        if not a.ckpt:
            p.error("load needs a checkpoint directory")
        load(a.ckpt, {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[a.dtype])
    elif a.what == "memory":
        memory(a)
    elif a.what == "compile":
        compile_report(not a.tiny)
    elif a.what == "train-memory":
        train_memory(a)
    elif a.what == "kernels":
        if a.tiny:
            os.environ["TRITON_INTERPRET"] = "1"  # before kernels (and triton) are imported
        kernels_bench(a.tiny)
    else:
        dit_child(a) if a.child else dit(a)
