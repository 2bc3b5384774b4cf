"""Measurements. Every figure printed here is measured in this run; compare ratios, not absolute times on CPU.

  python bench.py dit [--dim 1536 --heads 12 --layers 4 --frames 9 --size 416*240 --reps 3]
      DiT forward time and peak memory, vpae beside diffusers' WanTransformer3DModel when it is installed
      (same config, random weights, fp32 on CPU / bf16 on GPU), each in its own process, alternating.
  python bench.py memory [--preset i2v-14B --world 8 --sp 8 --frames 81 --size 832*480]
      Per-GPU peak of each kind of distill.py step (Models, shard, the step functions) from PyTorch's FSDPMemTracker
      on fake tensors, by category, and the fewest 80 GB / 141 GB GPUs; first checked against a measured 2-rank
      gloo run at small size. Without --preset: I2V-14B at 480p and 720p (world 8, sp 8) and T2V-1.3B (world 1).
  python bench.py compile [--tiny]
      Every Triton kernel, and each arch's own autotune configs, built for sm_90a and sm_80 (no GPU needed):
      registers, spills, shared memory, wgmma. --tiny: only the self-attention and fused-op shapes (what the test
      builds).
  python bench.py kernels [--tiny]
      On a GPU: bf16 attention fwd/bwd checked against fp64 beside SDPA's own bf16 error; attention time and TFLOP/s
      at Wan shapes beside the PyTorch path (SDPA) and SDPA's cuDNN and flash; the fused norm ops beside their
      PyTorch references and a copy of the same bytes. --tiny: the same code at tiny sizes on CPU, interpreted.
  python bench.py gpu [--part kernels|models] [--out gpu_summary.json] [--tiny]
      The GPU acceptance run in two parts of at most 6 minutes each (no --part: both, one after the other), merged
      into one JSON summary rewritten after every section; a section that fails records its error, the rest runs.
      kernels: as above, then the faster path per op on this GPU written to vpae_kernels/measured.json (what
      VPAE_KERNELS=auto reads). models: one DiT forward at 14B width, 480p x 81 frames; a 4-block 14B-width DiT
      forward + backward with its memory beside MemTracker's prediction; a few distill.py steps on a tiny checkpoint
      (world 1); a one-step sample.py on the bundled demo at 832x480 x 81 frames with stage times.
  python bench.py load CKPT_DIR
      Peak RSS while loading an official checkpoint and touching every weight, against its size.
  python bench.py startup CKPT_DIR [--world 2] [--dtype bf16]
      distill.py's start-up on --world gloo ranks: the peak RSS of each rank once distill.Models is built (G, its
      EMA, the teacher in --dtype, the heads), against the checkpoint's size.
"""
import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


CUDA = torch.cuda.is_available()


def timer(fn, grad_to_none=(), n=5 if CUDA else 1, budget_ms=300 if CUDA else 0):
    """Milliseconds per call after one untimed warm-up call (it compiles and autotunes): the median, min and max of at
    least n calls, and of more while they add up to under budget_ms (at most 100), each between CUDA events on a
    GPU. Unlike triton's do_bench, which takes one sample of a call over 100 ms, a slow call still gets n samples.
    On CPU (--tiny checks code paths, not speed) one call."""
    fn()
    ms = []
    while len(ms) < n or (sum(ms) < budget_ms and len(ms) < 100):
        for t in grad_to_none:
            t.grad = None
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), n=len(ms))


def _ms(t):  # a timer result as text: median [min-max] xn
    return f"{t['ms']:9.2f} ms [{t['min_ms']:.2f}-{t['max_ms']:.2f}] x{t['n']}"


def _kernels():
    import vpae_kernels as kernels
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
    out = []
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
        out.append(dict(B=B, H=H, Lq=Lq, Lk=Lk, D=D, k_lens=kl, **{f"{n}_err_o_dq_dk_dv": err[n] for n in err}))
    return out


def bench_attention(dev, dt, tiny):
    """Time and TFLOP/s forward and backward (FLOPs = 4 B H Lq Lk D fwd, 2.5x that bwd): Triton beside the PyTorch
    path `auto` falls back to (SDPA with its own backend choice) and, on a GPU, SDPA's cuDNN and flash backends."""
    from torch.nn.attention import SDPBackend
    A = _kernels()[0]
    shapes = [("self", 1, 2, 40, 40, 64), ("cross", 1, 2, 40, 12, 64)] if tiny else \
        [("self 32760", 1, 40, 32760, 32760, 128), ("self 75600", 1, 40, 75600, 75600, 128),
         ("cross 32760x512", 1, 40, 32760, 512, 128)]
    impls = [("triton", A.flash_attention), ("torch", A.attention_ref)] + ([] if dev == "cpu" else [
        ("sdpa-cudnn", _sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa-flash", _sdpa(SDPBackend.FLASH_ATTENTION))])
    print(f"attention speed ({dt}, {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu interpreter'}; "
          f"median [min-max] x samples)")
    out = []
    for name, B, H, Lq, Lk, D in shapes:
        q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dt, requires_grad=True) for L in (Lq, Lk, Lk))
        flops = 4 * B * H * Lq * Lk * D
        for impl, fn in impls:
            try:
                with torch.no_grad():
                    t_f = timer(lambda: fn(q, k, v))
                o = fn(q, k, v)
                do = torch.randn_like(o)
                t_b = timer(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v])
            except Exception as e:  # e.g. a backend that does not take this shape on this GPU: `auto` then picks torch
                print(f"  {name:16s} {impl:11s} n/a: {_line(e)}")
                out.append(dict(shape=name, impl=impl, error=_line(e)))
                continue
            finally:
                o = do = None  # freed before the next impl, after an error too
            print(f"  {name:16s} {impl:11s} fwd {_ms(t_f)} {flops / t_f['ms'] / 1e9:7.1f} TFLOP/s   "
                  f"bwd {_ms(t_b)} {2.5 * flops / t_b['ms'] / 1e9:7.1f} TFLOP/s")
            out.append(dict(shape=name, impl=impl, fwd=t_f, bwd=t_b, fwd_tflops=flops / t_f["ms"] / 1e9,
                            bwd_tflops=2.5 * flops / t_b["ms"] / 1e9))
        del q, k, v
    return out


def bench_fused(dev, tiny):
    """Time and GB/s of the fused norm ops, Triton beside their PyTorch references (fwd and bwd; the bytes are the
    [B, L, D] tensors they must read and write), and a clone of the same number of bytes."""
    _, N, R = _kernels()
    D, H = (64, 4) if tiny else (5120, 40)
    print(f"fused ops (D={D}; median [min-max] x samples; copy = clone() moving the same bytes)")
    out = []
    for L in ((16,) if tiny else (32760, 75600)):
        x32 = torch.randn(1, L, D, device=dev, requires_grad=True)
        xb = torch.randn(1, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        e = torch.randn(1, 2, D, device=dev, requires_grad=True)
        w = torch.randn(D, device=dev, requires_grad=True)
        ang = torch.rand(L, D // H // 2, device=dev)
        cos, sin = ang.cos(), ang.sin()
        ops = [  # op (as kernels.winner names it), dtypes, Triton, reference, args, bytes fwd (x in, y out),
            # bytes bwd (x, dy in, dx out), leaves
            ("ln_modulate", "fp32->bf16", N.ln_modulate, N.ln_modulate_ref,
             (x32, *e.chunk(2, dim=1), 1e-6, torch.bfloat16), L * D * (4 + 2), L * D * (4 + 2 + 4), [x32, e]),
            ("qk_norm_rope", "bf16", R.qk_norm_rope, R.qk_norm_rope_ref, (xb, w, H, 1e-6, cos, sin),
             L * D * (2 + 2) + 2 * cos.numel() * 4, L * D * (2 + 2 + 2) + 2 * cos.numel() * 4, [xb, w]),
        ]
        for op, dts, tri, ref, args, b_f, b_b, leaves in ops:
            copy = {}
            for tag, nbytes in (("fwd", b_f), ("bwd", b_b)):
                buf = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
                copy[tag] = timer(lambda: buf.clone())
            for impl, fn in (("triton", tri), ("torch", ref)):
                with torch.no_grad():
                    t = {"fwd": timer(lambda: fn(*args))}
                y = fn(*args)
                dy = torch.randn_like(y)
                t["bwd"] = timer(lambda: y.backward(dy, retain_graph=True), grad_to_none=leaves)
                line = []
                for tag, nbytes in (("fwd", b_f), ("bwd", b_b)):
                    gbps, copy_gbps = nbytes / t[tag]["ms"] / 1e6, nbytes / copy[tag]["ms"] / 1e6
                    line.append(f"{tag} {_ms(t[tag])} {gbps:7.0f} GB/s ({gbps / copy_gbps:4.0%} of copy)")
                    out.append(dict(op=op, impl=impl, L=L, dir=tag, **t[tag], gbps=gbps, copy_gbps=copy_gbps))
                print(f"  L={L:6d} {op} {dts:10s} {impl:6s} " + "   ".join(line))
                del y, dy
    return out


def kernel_choice(res, path):
    """Per op, the path `auto` is to take on this chip, from this run's timings: Triton where its fwd + bwd time,
    summed over the shapes, is at most the PyTorch path's (and it ran them all), else torch. Merged into the per-chip
    table at path (vpae_kernels/measured.json on a GPU), written atomically; speedup = torch time / Triton time."""
    got = lambda k: res[k] if isinstance(res.get(k), list) else []  # a failed section: no rows, so torch  # noqa: E731
    rows = [dict(r, op="attention", ms=r["fwd"]["ms"] + r["bwd"]["ms"]) if "fwd" in r else dict(r, op="attention")
            for r in got("attention_speed")] + got("fused_ops")
    choice = {}
    for op in ("attention", "ln_modulate", "qk_norm_rope"):
        tri, ref = ([r for r in rows if r["op"] == op and r["impl"] == i] for i in ("triton", "torch"))
        if not tri or not ref or any("error" in r for r in tri + ref):
            choice[op] = {"use": "torch", "speedup": None}
            continue
        speedup = sum(r["ms"] for r in ref) / sum(r["ms"] for r in tri)
        choice[op] = {"use": "triton" if speedup >= 1 else "torch", "speedup": round(speedup, 3)}
    chip = torch.cuda.get_device_name() if CUDA else "cpu"
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    table[chip] = table.get(chip, {}) | choice
    write_json(table, path)
    import vpae_kernels as kernels
    kernels._table = None  # read again at the next op: a later section of this run takes the new winners
    print(f"kernel choice for {chip} (in {path}): {choice}")
    return choice


def write_json(obj, path):
    """data.write_json (atomic), imported on use: data imports the kernels, which --tiny must set TRITON_INTERPRET for
    first."""
    import data
    data.write_json(obj, path)


def _line(e):  # an exception in one line
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _model(cfg, dev, dt):
    """A WanModel with random (official-init) weights, created in dt on dev: at 14B width never in fp32 (61 GiB)."""
    from model import WanModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev):
            return WanModel(cfg)
    finally:
        torch.set_default_dtype(default)


def dit_latency(dev, tiny):
    """One DiT forward at 14B width (random bf16 weights, 480p x 81 frames), and what 1 step and 50 CFG steps cost."""
    from model import PRESETS, WanConfig
    cfg = WanConfig("i2v", in_dim=36, dim=64, ffn_dim=128, num_heads=4, num_layers=2) if tiny else PRESETS["i2v-14B"]
    F_, H, W = (2, 4, 4) if tiny else (21, 60, 104)  # latent of 81 frames at 832x480
    dt = torch.bfloat16

    def build():
        m = _model(cfg, dev, dt).eval()
        with torch.device(dev):
            x, y = torch.randn(1, 16, F_, H, W), torch.randn(1, 20, F_, H, W)
            ctx, clip = torch.randn(1, 512, cfg.text_dim), torch.randn(1, 257, cfg.clip_dim)
            t = torch.tensor([999])
        return lambda: m(x, t, ctx, clip, y)

    with torch.no_grad():
        t = timer(build())
        ms = t["ms"]
        res = dict(tokens=F_ * H * W // 4, forward_ms=ms, forward_min_ms=t["min_ms"], forward_max_ms=t["max_ms"],
                   samples=t["n"]) | mfu(fake_flops(lambda: build()()), ms / 1e3)
    print(f"DiT forward, {'tiny' if tiny else 'i2v-14B'} width, {res['tokens']} tokens, {dt}: {_ms(t)} per NFE "
          f"({_mfu_str(res)}); 1 step (1 NFE) {ms / 1e3:.2f} s vs 50 steps with CFG (100 NFE, from the per-NFE time) "
          f"{ms / 10:.1f} s")
    return res


def fake_flops(run):
    """FLOPs of run() counted on fake tensors (no memory, no time), through the PyTorch path of the kernels: the
    Triton kernels do the same matmuls, and FlopCounterMode cannot see inside them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import vpae_kernels as kernels
    mode, kernels.MODE = kernels.MODE, "torch"
    try:
        with FakeTensorMode(), flop_counter() as fc:
            run()
    finally:
        kernels.MODE = mode
    return fc.get_total_flops()


def peak_tflops(name):
    """The card's dense bf16 tensor-core peak from NVIDIA's datasheets, or None when this table does not know it."""
    return next((v for k, v in PEAK_TFLOPS.items() if all(w in name for w in k.split())), None)


def mfu(flops, seconds):
    """Achieved TFLOP/s and, on a card peak_tflops knows, the model FLOPs utilisation against its dense bf16 peak."""
    peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    tf = flops / seconds / 1e12
    return dict(flops=flops, tflops_s=tf, mfu=tf / peak if peak else None)


def _mfu_str(r):
    return f"{r['flops'] / 1e12:.3g} TFLOP, {r['tflops_s']:.3g} TFLOP/s" + (f", MFU {r['mfu']:.1%}" if r["mfu"] else "")


def kernels_bench(tiny):
    """The kernel measurements (bench.py gpu's kernels part, without the table it writes); tiny: the same code at
    tiny sizes on CPU under TRITON_INTERPRET=1."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not (tiny and os.environ.get("TRITON_INTERPRET") == "1"):
        raise SystemExit("bench.py kernels needs a CUDA GPU; --tiny runs it on CPU under the Triton interpreter")
    dt = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter's bf16 dot is broken
    return dict(attention_check=check_attention(dev, dt, tiny), attention_speed=bench_attention(dev, dt, tiny),
                fused_ops=bench_fused(dev, tiny))


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
    with what ptxas reports: one dict per build. An autotuned kernel is built with its own config list per arch."""
    import triton
    A = _kernels()[0]
    rows, seen = [], set()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = True, True  # ptxas runs, talks
        for case, run in cases:
            for k, args, kw in _launches(run):
                tuned = hasattr(k, "configs")
                fn = k.fn if tuned else k  # an Autotuner wraps the JITFunction; a kernel per config
                name = f"{fn.__module__.split('.')[-1]}.{fn.__name__}"
                for arch in archs:
                    for c in [c.all_kwargs() for c in A._configs(fn.__name__, ARCHS[arch][0])] if tuned else [{}]:
                        kwargs = {**kw, **c}
                        config = (f"{c['BLOCK_M']}x{c['BLOCK_N']} " if c else "") + \
                            f"w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"  # triton's defaults: 4, 3
                        key = (name, config, repr([a for a in args if not isinstance(a, torch.Tensor)]), repr(kw), arch)
                        if key not in seen:
                            seen.add(key)
                            t0 = time.perf_counter()
                            r = _build(fn, args, kwargs, arch)
                            rows.append(dict(case=case, kernel=name, config=config, arch=arch,
                                             s=time.perf_counter() - t0, **r))
    return rows


def compile_report(full):
    """One line per kernel and config, the worst over the cases (shapes, k_lens or not) for each arch whose list
    has that config."""
    cases = compile_cases(full)
    t0 = time.perf_counter()
    rows = compile_table(cases)
    print(f"Triton kernels built ahead of time for sm_90a and sm_80 with the ptxas in the triton wheel (no GPU), "
          f"{len(rows)} builds in {time.perf_counter() - t0:.0f} s, each the worst over: {', '.join(c for c, _ in cases)}")
    print(f"{'kernel':28s} {'config':13s}" + "".join(f" | {a:6s} regs spill(st/ld B) smem KiB (max) mma" for a in ARCHS))
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["config"]), {}).setdefault(r["arch"], []).append(r)
    for (kernel, config), by_arch in groups.items():
        line = f"{kernel:28s} {config:13s}"
        for arch in ARCHS:
            rs = by_arch.get(arch)
            if not rs:  # not in this arch's list
                line += f" | {arch:6s} {'-':>4s}" + " " * 40
                continue
            w = lambda k: max(r[k] for r in rs)  # noqa: E731
            line += f" | {arch:6s} {w('regs'):4d} {w('spill_st'):6d}/{w('spill_ld'):<6d} {w('smem') / 1024:8.0f} " \
                    f"({rs[0]['smem_max'] // 1024}) {'/'.join(sorted({r['mma'] for r in rs})):5s}"
        print(line)
    bad = [r for r in rows if r["spill_st"] or r["spill_ld"] or r["smem"] > r["smem_max"]]
    print(f"{len(bad)} of {len(rows)} builds spill registers or overflow shared memory" +
          "".join(f"\n  {r['arch']} {r['kernel']} {r['config']} ({r['case']})" for r in bad))


def dit_memory(dev, tiny):
    """A few DiT blocks at 14B width, 480p x 81 frames, bf16: forward + backward with per-block checkpointing. The
    measured peak of a step (after a warm-up step that autotunes) beside MemTracker's prediction on fake tensors of
    the same step (which takes the PyTorch path of the kernels: fake tensors cannot launch Triton)."""
    from dataclasses import replace
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    import vpae_kernels as kernels
    from model import PRESETS, WanConfig
    cfg = WanConfig("i2v", in_dim=36, dim=64, ffn_dim=128, num_heads=4, num_layers=2) if tiny else \
        replace(PRESETS["i2v-14B"], num_layers=4)
    F_, H, W = (2, 4, 4) if tiny else (21, 60, 104)
    dt = torch.bfloat16

    def build():
        m = _model(cfg, dev, dt)
        m.grad_ckpt = True
        with torch.device(dev):
            x, y = torch.randn(1, 16, F_, H, W), torch.randn(1, 20, F_, H, W)
            ctx, clip = torch.randn(1, 512, cfg.text_dim), torch.randn(1, 257, cfg.clip_dim)
            t = torch.tensor([999])
        return m, (x, t, ctx, clip, y)

    def step(m, inputs):
        m(*inputs).square().mean().backward()

    mode, kernels.MODE = kernels.MODE, "torch"
    try:
        with FakeTensorMode(), MemTracker() as mt:
            step(*build())  # the model is built inside: the prediction counts its weights, as the peak below does
    finally:
        kernels.MODE = mode
    pred = max(v["Total"] for v in mt.get_tracker_snapshot("peak").values())  # the device's (a few bytes on CPU)
    res = dict(blocks=cfg.num_layers, tokens=F_ * H * W // 4, tracked_peak_gib=pred / 2**30)
    m, inputs = build()
    step(m, inputs)  # warm-up: the first step autotunes the kernels
    m.zero_grad(set_to_none=True)
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = timer(lambda: step(m, inputs), grad_to_none=list(m.parameters()))
    res |= dict(fwd_bwd_s=t["ms"] / 1e3, fwd_bwd_min_s=t["min_ms"] / 1e3, fwd_bwd_max_s=t["max_ms"] / 1e3,
                samples=t["n"])
    if dev == "cuda":
        res["measured_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del m, inputs
    res |= mfu(fake_flops(lambda: step(*build())), res["fwd_bwd_s"])  # checkpointing's recomputed forward counts
    print(f"DiT forward + backward, {res['blocks']} blocks, {res['tokens']} tokens, checkpointing, {dt}: " +
          ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
                    if k not in ("flops", "tflops_s", "mfu")) + (f"; {_mfu_str(res)}" if "flops" in res else ""))
    return res


def tiny_run_files(root, model_type="t2v", dim=64, heads=4, layers=2, frames=9, size="64*64", clips=4):
    """A random official-layout checkpoint and a precomputed latents folder of random clips, for distill.py."""
    from safetensors.torch import save_file
    from model import WanConfig, WanModel
    conf = dict(model_type=model_type, dim=dim, ffn_dim=4 * dim, num_heads=heads, num_layers=layers, text_len=64,
                in_dim=16 if model_type == "t2v" else 36)
    ckpt, lat = os.path.join(root, "ckpt"), os.path.join(root, "latents")
    os.makedirs(ckpt), os.makedirs(lat)
    save_file({k: v.contiguous() for k, v in WanModel(WanConfig(**conf)).state_dict().items()},
              os.path.join(ckpt, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(conf, f)
    W, H = map(int, size.split("*"))
    shape = (16, (frames - 1) // 4 + 1, H // 8, W // 8)
    cl = [{"id": f"{i:06d}", "shard": "shard_00000.safetensors", "caption": "x", "file": f"{i}.mp4"} for i in range(clips)]
    save_file({f"{c['id']}.{k}": torch.randn(*s) for c in cl for k, s in (("latent", shape), ("context", (20, 4096)))},
              os.path.join(lat, "shard_00000.safetensors"))
    save_file({"context": torch.randn(20, 4096)}, os.path.join(lat, "neg_context.safetensors"))
    with open(os.path.join(lat, "manifest.json"), "w") as f:
        json.dump({"model_type": model_type, "frames": frames, "size": size, "clips": cl, "skipped": {}}, f)
    return ckpt, lat


def distill_run(root):
    """A few real distill.py steps (both phases, a checkpoint, the export) in this process: NCCL on a GPU, world 1.
    Its log's peak_mem_gib is this run's own: bench.py gpu resets the peak before each section."""
    import distill
    ckpt, lat = tiny_run_files(root)
    out = os.path.join(root, "run")
    t0 = time.perf_counter()
    distill.main([f"--teacher={ckpt}", f"--data={lat}", f"--out={out}", "--phase1_steps=2", "--phase2_steps=2",
                  "--batch_size=1", "--log_every=1", "--param_dtype=bf16"])
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert all(math.isfinite(v) for r in log for v in r.values()), "a non-finite loss"
    res = dict(steps=len(log), wall_s=time.perf_counter() - t0, step_s=[r["step_s"] for r in log],
               peak_mem_gib=max(r["peak_mem_gib"] for r in log), exported=os.path.isfile(os.path.join(out, "student.safetensors")))
    print(f"distill.py, tiny checkpoint, world 1: {res}")
    return res


def sample_run(root, tiny):
    """The README's one-step sample on the bundled demo (tiny weights), at 832x480 x 81 frames on a GPU: stage times."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "sample.py"), "--image", os.path.join(here, "assets", "example.png"),
           "--out", os.path.join(root, "sample.mp4"), "--dtype=bf16"] + \
        ([] if tiny else ["--size=832*480", "--frames=81"])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if r.returncode:
        raise RuntimeError(f"sample.py failed:\n{r.stderr[-3000:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("time: "))
    *stages, total = line[6:].split(" | ")  # "name 1.2s | ... | total 3.4s, 2.1s without the VAE decode"
    times = {k: float(v.rstrip("s")) for k, v in (part.rsplit(" ", 1) for part in stages)}
    t_all, t_no_vae = (float(w) for w in re.findall(r"([\d.]+)s", total))
    res = dict(stage_s=times, total_s=t_all, without_vae_decode_s=t_no_vae)
    print(f"sample.py one step, demo weights: {res}")
    return res


# (minutes on an H100, an estimate from reading the code: not measured yet), sections; kernel_choice writes the table
GPU_PARTS = {"kernels": (5, ["attention_check", "attention_speed", "fused_ops", "kernel_choice"]),
             "models": (3, ["dit_forward", "dit_train_memory", "distill", "sample"])}


def gpu(a):
    """The GPU acceptance run in parts (--part kernels | models, each at most 6 minutes; all: both). Each section runs
    on its own: a failure records {"error": ...} and the run goes on; --out is rewritten after every section and
    keeps what other parts wrote there. On CPU, --tiny runs the same code at tiny sizes, bf16 where a GPU runs bf16
    (the attention kernel in fp16: the interpreter's bf16 dot is broken)."""
    import tempfile
    import traceback
    dev = "cuda" if CUDA else "cpu"
    if dev == "cpu" and not a.tiny:
        raise SystemExit("bench.py gpu needs a CUDA GPU; --tiny runs it on CPU under the Triton interpreter")
    import vpae_kernels as kernels
    root = tempfile.mkdtemp(prefix="vpae-gpu-")
    dt = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter's bf16 dot is broken
    table = kernels.MEASURED if CUDA else os.path.join(root, "measured.json")  # --tiny on CPU: a throwaway table
    res = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            res = json.load(f)
    res |= dict(device=torch.cuda.get_device_name() if CUDA else "cpu (interpreter)", torch=torch.__version__)
    run = {"attention_check": lambda: check_attention(dev, dt, a.tiny),
           "attention_speed": lambda: bench_attention(dev, dt, a.tiny), "fused_ops": lambda: bench_fused(dev, a.tiny),
           "kernel_choice": lambda: kernel_choice(res, table),
           "dit_forward": lambda: dit_latency(dev, a.tiny), "dit_train_memory": lambda: dit_memory(dev, a.tiny),
           "distill": lambda: distill_run(root), "sample": lambda: sample_run(root, a.tiny)}
    for part in GPU_PARTS if a.part == "all" else [a.part]:
        minutes, sections = GPU_PARTS[part]
        print(f"bench.py gpu, part {part}: about {minutes} min on an H100 (an estimate from reading the code, not "
              f"measured): {', '.join(sections)}", flush=True)
        t0 = time.perf_counter()
        for name in sections:
            if CUDA:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t1 = time.perf_counter()
            try:
                res[name] = run[name]()
            except (Exception, SystemExit) as e:  # distill.main and sample.py exit on a user error: record it too
                traceback.print_exc()
                res[name] = {"error": _line(e)}
            res.setdefault("section_s", {})[name] = time.perf_counter() - t1
            if CUDA:
                res.setdefault("peak_mem_gib", {})[name] = torch.cuda.max_memory_allocated() / 2**30
            write_json(res, a.out)
        print(f"bench.py gpu, part {part}: {time.perf_counter() - t0:.0f} s, summary in {a.out}", flush=True)


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


def startup(a):
    if not a.child:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.world}", "--standalone",
                        __file__, "startup", a.ckpt, "--child", f"--dtype={a.dtype or 'fp32'}"], check=True)
        return
    import torch.distributed as dist
    import distill
    from model import weight_files
    cfg = distill.parse_args([f"--teacher={a.ckpt}", f"--param_dtype={a.dtype}"])
    device, *_, wait_group = distill.setup_dist(cfg, *distill.launch_env())
    t0 = time.perf_counter()
    distill.Models(cfg, device, None)
    size = sum(os.path.getsize(f) for f in weight_files(a.ckpt))
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: Models built in {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {rss_peak() / 2**30:.2f} GiB = {rss_peak() / size:.2f}x the {size / 2**30:.2f} GiB checkpoint "
          f"(teacher in {a.dtype})", flush=True)
    dist.barrier(wait_group)
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# memory: PyTorch's FSDPMemTracker on fake tensors, through distill.py's own Models, shard and step functions

CASES = [("i2v-14B", "832*480", 81, 8, 8, 0), ("i2v-14B", "1280*720", 81, 8, 8, 0), ("t2v-1.3B", "832*480", 81, 1, 1, 0),
         ("i2v-14B", "832*480", 81, 64, 8, 8)]  # (preset, size, frames, world, sp, shard_ranks: HSDP 8 nodes x 8)
CATEGORIES = ["Sharded Param", "Sharded Grad", "OptState", "Unsharded Param", "Unsharded Grad", "All Gather",
              "Reduce Scatter", "Activation", "Temp", "Inputs", "Buffer"]
SHARDED = ("Sharded Param", "Sharded Grad", "OptState")  # what FSDP divides by the world size


def _tracker(roots, opts):
    """FSDPMemTracker over several FSDP roots and optimizers (it takes one of each), where a model may run more
    than once per step (the teacher does: CFG, then the fake score)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class Tracker(FSDPMemTracker):
        def _fsdp_state_pre_forward(self, fsdp_mod, orig):
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

            def pre(*args, **kwargs):  # a root's second forward in one step is refused: forget its module stats
                if any(fsdp_mod is r for r in roots) and not self._mod_tracker.is_bw:
                    self.memory_tracking.pop(fsdp_mod, None)
                return inner(*args, **kwargs)
            return pre

        def _instrument_optimizer(self):
            handles = []
            for self._optm in opts:
                super()._instrument_optimizer()
                handles += self._optimizer_hook_handles
            self._optimizer_hook_handles = handles

    t = Tracker(roots[0])
    t._root_mod = torch.nn.ModuleList(roots)
    return t


def distill_steps(mc, cfg, device, mesh, sp_group, frames, size):
    """distill.Models built from the model config mc instead of a checkpoint, its three optimizers with their Adam
    state materialised (distill.main does that before step 1), a batch, and distill.main's three kinds of step."""
    from unittest import mock
    import distill
    from model import WanModel
    frozen = lambda *a, **k: WanModel(mc).eval().requires_grad_(False)  # as from_pretrained returns it  # noqa: E731
    with mock.patch.object(distill.WanModel, "from_pretrained", frozen), \
            mock.patch("torch.distributed.device_mesh.init_device_mesh", lambda *a, **k: mesh):
        m = distill.Models(cfg, device, sp_group)
    # foreach=False: with foreach the tracker inflates the step (the issue's pitfall); a GPU would use foreach
    opts = {"gen": torch.optim.Adam(m.gen.parameters(), lr=cfg.lr_phase1, foreach=False),
            "fake": torch.optim.Adam([p for p in m.teacher.parameters() if p.requires_grad], lr=cfg.lr_fake, foreach=False),
            "disc": torch.optim.Adam(m.disc.parameters(), lr=cfg.lr_disc, betas=(cfg.beta1, cfg.beta2), foreach=False)}
    for o in opts.values():
        for p in o.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        o.step()
        o.zero_grad(set_to_none=True)
    W, H = map(int, size.split("*"))
    lat = (1, 16, (frames - 1) // 4 + 1, H // 8, W // 8)
    clip = {} if mc.model_type == "t2v" else {"y": torch.randn(1, 20, *lat[2:]), "clip": torch.randn(1, 257, mc.clip_dim)}
    batch = distill.prepare({"latent": torch.randn(lat), "context": torch.randn(1, mc.text_len, mc.text_dim), **clip},
                            torch.randn(mc.text_len, mc.text_dim), mc.text_len, "cpu")  # contexts as padded
    rng = [torch.Generator().manual_seed(0)]  # one per clip: the batch is one clip

    def step(*names):  # distill.main's opt_step without the grad-norm bookkeeping
        for n in names:
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
    steps = {"Phase I: generator + fake-score step": lambda: (distill.phase1_step(cfg, m, batch, rng), step("gen", "fake")),
             "Phase II: D step": lambda: (distill.phase2_d_step(cfg, m, batch, rng), step("disc")),
             "Phase II: G step": lambda: (distill.phase2_g_step(cfg, m, batch, rng), step("disc", "gen"),
                                          distill.ema_update(m.ema, m.gen, cfg.ema))}
    return m, opts, batch, steps


def _model_cfg(a):
    from model import PRESETS, WanConfig
    return PRESETS[a.preset] if a.preset != "custom" else \
        WanConfig("t2v", dim=a.dim, ffn_dim=a.ffn, num_heads=a.heads, num_layers=a.layers, text_dim=256, text_len=64)


def flop_counter():
    """FlopCounterMode, also counting the CPU SDPA op (its formula is the GPU ops' one) that fake tensors run."""
    from torch.utils import flop_counter as fcm
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, fcm.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, fcm.sdpa_backward_flop)):
        if op not in fcm.flop_registry:  # a second registration raises
            fcm.register_flop_formula(op, get_raw=True)(formula)
    return fcm.FlopCounterMode(display=False)


def memory_child(a):
    """One case on fake tensors, as rank 0 of a fake process group: a json line per step with the tracker's peak
    by category and its total when the step began. --device cuda: bf16 compute (FSDP's policy on a GPU)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import distill
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=a.world)
    sp_group = dist.new_group(list(range(a.sp))) if a.sp > 1 else None
    # --device cuda stands for a GPU's bf16 compute (and bf16 teacher); the mesh, and so every tensor, stays on (fake) CPU
    cfg = distill.Config(sp=a.sp, disc_width=a.disc_width, param_dtype="bf16" if a.device == "cuda" else "fp32",
                         shard_ranks=a.shard_ranks)
    mesh = distill.fsdp_mesh(cfg, torch.device("cpu"))  # outside FakeTensorMode
    with FakeTensorMode():
        m, opts, batch, steps = distill_steps(_model_cfg(a), cfg, torch.device("cpu"), mesh, sp_group, a.frames, a.size)
        for name, fn in steps.items():
            t0 = time.perf_counter()
            t = _tracker([m.gen, m.ema, m.teacher, m.disc], list(opts.values()))
            t.track_inputs((batch,))
            with t:  # one step per tracker: it refuses a second iteration
                (start,) = t.get_tracker_snapshot().values()
                fn()
            (peak,) = t.get_tracker_snapshot("peak").values()
            with flop_counter() as fc:  # a pass of its own: under FlopCounterMode the tracker saw the activations of
                fn()  # every block kept, as if checkpointing were off (14B 480p, Phase I: 96 GiB against 2.4)
            print(json.dumps({"step": name, "peak": peak, "start": start["Total"], "flops": fc.get_total_flops(),
                              "s": time.perf_counter() - t0}), flush=True)
        with torch.no_grad(), flop_counter() as fc:  # a one-step sample: one generator forward (no encoders, no VAE)
            distill.run(m.gen, batch["latent"], torch.ones(1), batch["cond"])
        print(json.dumps({"step": "one-step sample (DiT forward)", "flops": fc.get_total_flops()}), flush=True)


def _child_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _case_args(preset, size, frames, world, sp, shard_ranks, device, a):
    return [sys.executable, __file__, "memory", "--child", f"--preset={preset}", f"--size={size}", f"--frames={frames}",
            f"--world={world}", f"--sp={sp}", f"--shard_ranks={shard_ranks}", f"--device={device}",
            f"--disc_width={a.disc_width}"] + \
        [f"--{k}={getattr(a, k)}" for k in ("dim", "ffn", "heads", "layers")]


def rss_now():
    """(resident, peak resident) bytes of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        v = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.startswith(("VmRSS", "VmHWM"))}
    return v["VmRSS"], v["VmHWM"]


def memory_measure(a):
    """One rank of the CPU check (under torchrun, gloo): the same steps on real tensors, each step's peak RSS above
    its start (the peak is reset before it), as json lines from rank 0."""
    import torch.distributed as dist
    import distill
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    sp_group = dist.new_group(list(range(a.sp))) if a.sp > 1 else None  # world == sp here: one group
    torch.manual_seed(0)
    base = rss_now()[0]
    cfg = distill.Config(sp=a.sp, disc_width=a.disc_width)
    m, opts, batch, steps = distill_steps(_model_cfg(a), cfg, torch.device("cpu"), mesh, sp_group, a.frames, a.size)
    for name, fn in steps.items():
        dist.barrier()
        start = rss_now()[0]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        fn()
        if rank == 0:
            print(json.dumps({"step": name, "peak_above_start": rss_now()[1] - start, "start_above_base": start - base}),
                  flush=True)
    dist.destroy_process_group()


def memory_validate(a):
    """Tracker on fake tensors against a measured 2-rank gloo run of the same small config (fp32 on CPU)."""
    size, frames = "256*256", 9
    a = argparse.Namespace(**{**vars(a), "preset": "custom", "dim": 768, "ffn": 3072, "heads": 6, "layers": 4})
    pred = _child_json(_case_args("custom", size, frames, 2, 2, 0, "cpu", a))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")  # large frees go back to the OS
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", __file__, "memory",
           "--measure", "--preset=custom", f"--size={size}", f"--frames={frames}", "--sp=2", f"--disc_width={a.disc_width}"
           ] + [f"--{k}={getattr(a, k)}" for k in ("dim", "ffn", "heads", "layers")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"the measured CPU run failed:\n{out.stderr[-3000:]}")
    meas = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print(f"check on this CPU: dim {a.dim}, {a.layers} layers, {frames} frames at {size}, 2 gloo ranks, sp 2, fp32; "
          f"per rank, GiB")
    print(f"  {'step':40s} {'state at start: tracked':>24s} {'measured RSS':>13s}  {'step peak above start: tracked':>31s}"
          f" {'measured RSS':>13s}")
    for p, r in zip(pred, meas):
        print(f"  {p['step']:40s} {p['start'] / 2**30:24.3f} {r['start_above_base'] / 2**30:13.3f}  "
              f"{(p['peak']['Total'] - p['start']) / 2**30:31.3f} {r['peak_above_start'] / 2**30:13.3f}")


# dense bf16 tensor-core peak TFLOP/s, NVIDIA's datasheets, keyed by words of torch.cuda.get_device_name()
# ("NVIDIA H100 80GB HBM3" is the SXM card); the first two are the roofline floor's
PEAK_TFLOPS = {"H100 HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.5, "A100": 312.0}


def memory(a):
    if a.measure:
        return memory_measure(a)
    if a.child:
        return memory_child(a)
    print("per-GPU memory of distill.py's steps from PyTorch's FSDPMemTracker "
          "(torch.distributed._tools.fsdp2_mem_tracker) on fake tensors, rank 0 of a fake process group: the tensors "
          "alone, without the CUDA context, NCCL buffers or allocator fragmentation; FLOPs from "
          "torch.utils.flop_counter.FlopCounterMode in a second pass of each step")
    t0 = time.perf_counter()
    cases = CASES if a.preset is None else [(a.preset, a.size, a.frames, a.world, a.sp, a.shard_ranks)]
    procs = [subprocess.Popen(_case_args(*c, "cuda", a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cases]  # the cases run side by side, one process each
    memory_validate(a)
    for (preset, size, frames, world, sp, shard_ranks), p in zip(cases, procs):
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"the {preset} {size} case failed:\n{err[-3000:]}")
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        W, H = map(int, size.split("*"))
        tokens = ((frames - 1) // 4 + 1) * (H // 16) * (W // 16)
        print(f"{preset}, {frames} frames at {size} ({tokens} tokens), world {world}, sp {sp}" +
              (f", HSDP: sharded within {shard_ranks} ranks, {world // shard_ranks} replicas" if shard_ranks else "") +
              ", bf16 compute, fp32 master "
              f"weights and reduce, micro-batch 1, the default Config ({time.perf_counter() - t0:.0f} s so far); per GPU:")
        steps = [r for r in rows if "peak" in r]
        cats = [c for c in CATEGORIES if any(r["peak"].get(c) for r in steps)]
        print(f"  {'GiB at the peak of':37s} {'peak':>6s} " + " ".join(f"{c:>15s}" for c in cats))
        for r in steps:
            print(f"  {r['step']:37s} {r['peak']['Total'] / 2**30:6.1f} " +
                  " ".join(f"{r['peak'].get(c, 0) / 2**30:15.2f}" for c in cats))
        for gb in (80, 141) if not shard_ranks else ():  # on N GPUs the sharded states are world/N of these
            need = lambda n: max(sum(v for c, v in r["peak"].items() if c in SHARDED) * world / n +  # noqa: E731
                                 sum(v for c, v in r["peak"].items() if c not in SHARDED + ("Total",)) for r in steps)
            n = next((n for n in range(sp, 1025, sp) if need(n) <= gb * 1e9), None)
            print(f"  fewest {gb} GB GPUs at sp {sp}: {n} ({need(n) / 2**30:.1f} GiB each at the peak)" if n else
                  f"  does not fit {gb} GB GPUs at sp {sp}")
        for r in rows:  # the roofline floor: this GPU's FLOPs at the dense bf16 peak
            print(f"  {r['step']:37s} {r['flops'] / 1e12:9.1f} TFLOP per GPU; floor " + ", ".join(
                f"{k} {r['flops'] / v / 1e12:.2f} s" for k, v in list(PEAK_TFLOPS.items())[:2]))


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


def parser():
    """bench.py's command line; every flag a user passes has a help text with its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dit", "load", "startup", "memory", "kernels", "compile", "gpu"],
                   help="which measurement (each is described above)")
    p.add_argument("ckpt", nargs="?", help="checkpoint directory (load, startup)")
    p.add_argument("--dim", type=int, default=1536, help="dit, memory --preset=custom: model width (default 1536)")
    p.add_argument("--ffn", type=int, default=8960, help="dit, memory --preset=custom: FFN width (default 8960)")
    p.add_argument("--heads", type=int, default=12, help="dit, memory --preset=custom: attention heads (default 12)")
    p.add_argument("--layers", type=int, default=4, help="dit, memory --preset=custom: DiT blocks (default 4)")
    p.add_argument("--frames", type=int, default=None, help="default 9 (dit), 81 (memory)")
    p.add_argument("--size", default=None, help="W*H in pixels; default 416*240 (dit), 832*480 (memory)")
    p.add_argument("--reps", type=int, default=3, help="dit: timed forwards per process, after a warm-up (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="dit: processes per implementation, alternating (default 3)")
    p.add_argument("--impl", default="vpae", choices=["vpae", "diffusers"],
                   help="dit --child: the implementation this process times (default vpae)")
    p.add_argument("--preset", help="memory: one case of this preset (default: the three cases of bench.CASES)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--disc_width", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=None, help="memory: default 8; startup: default 2")
    p.add_argument("--sp", type=int, default=8, help="memory --preset: sequence-parallel ranks (default 8)")
    p.add_argument("--shard_ranks", type=int, default=0,
                   help="memory: HSDP, sharded within this many ranks (default 0: FSDP over all ranks)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="load: convert to this dtype while loading (default: as "
                   "stored); startup: distill's --param_dtype (default fp32)")
    p.add_argument("--tiny", action="store_true", help="compile: only the shapes the test builds; kernels, gpu: tiny "
                   "sizes on CPU under the Triton interpreter (default off)")
    p.add_argument("--out", default="gpu_summary.json", help="gpu: the JSON summary (parts merge into it; default "
                   "gpu_summary.json)")
    p.add_argument("--part", default="all", choices=["kernels", "models", "all"],
                   help="gpu: which part to run (default all)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    p = parser()
    a = p.parse_args()
    a.frames = a.frames or (81 if a.what == "memory" else 9)
    a.world = a.world or (2 if a.what == "startup" else 8)
    a.size = a.size or {"memory": "832*480"}.get(a.what, "416*240")
    if a.what == "load":
        if not a.ckpt:
            p.error("load needs a checkpoint directory")
        load(a.ckpt, {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[a.dtype])
    elif a.what == "startup":
        if not a.ckpt:
            p.error("startup needs a checkpoint directory")
        startup(a)
    elif a.what == "memory":
        memory(a)
    elif a.what == "compile":
        compile_report(not a.tiny)
    elif a.what in ("kernels", "gpu"):
        if a.tiny:
            os.environ["TRITON_INTERPRET"] = "1"  # before kernels (and triton) are imported
        kernels_bench(a.tiny) if a.what == "kernels" else gpu(a)
    else:
        dit_child(a) if a.child else dit(a)
