"""Sample a video from a Wan2.1 checkpoint: a distilled V-PAE student in one step (or a few), or the teacher.

  python sample.py --ckpt_dir Wan2.1-I2V-14B-480P --image x.png --prompt "..." --student student.safetensors
  python sample.py --ckpt_dir Wan2.1-T2V-1.3B --prompt "..." --teacher        # 50 Euler steps with CFG
  python sample.py --image assets/example.png    # the bundled demo: its student, prompt, size from its config.json

I2V or T2V follows the checkpoint's config.json. The I2V condition is built as the official pipeline builds it
(Wan2.1's own I2V pipeline); the samplers are those of the README's "How V-PAE works", "Inference".
Under torchrun (WORLD_SIZE > 1) the DiT runs with Ulysses sequence parallelism over the ranks.
"""
import argparse
import contextlib
import json
import math
import os
import re
import time

import imageio.v2 as imageio
import imageio.v3 as iio
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from encoders import CLIPVision, T5Encoder
from model import WanModel, load_config, read_safetensors, weight_files
from vae import WanVAE

DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")  # bundled demo model
T5_FILE, TOKENIZER_DIR = "models_t5_umt5-xxl-enc-bf16.pth", os.path.join("google", "umt5-xxl")
VAE_FILE, CLIP_FILE = "Wan2.1_VAE.pth", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
# Wan's default negative prompt: "bright tones, overexposed, static, blurred details, subtitles, ..., walking backwards"
NEG_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
              "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
              "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
I2V_NEG_PREFIX = "镜头晃动，"  # "camera shake,": official I2V prepends it
SIZES_480P = ((832, 480), (480, 832))  # official I2V samples these with shift 3.0, every other size with 5.0
FPS = 16
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


def bar(items, desc):
    """A tiny text progress bar over items: `desc [#####.......] i/n  elapsed`."""
    items, t0 = list(items), time.time()
    for i in range(len(items) + 1):
        k = 24 * i // max(len(items), 1)
        log(f"\r{desc:<10} [{'#' * k}{'.' * (24 - k)}] {i}/{len(items)} {time.time() - t0:6.1f}s",
            end="\n" if i == len(items) else "")
        if i < len(items):
            yield items[i]


# -----------------------------------------------------------------------------
# the request: sizes, the image, the checkpoint's files, the I2V condition (data.py reuses these)


def parse_lora(s):
    """'file.safetensors:0.8' -> (file, 0.8); without ':SCALE' the scale is 1."""
    path, _, scale = s.rpartition(":")
    try:
        return (path, float(scale)) if path else (s, 1.0)
    except ValueError:
        return s, 1.0


def parse_size(s):
    """'832*480' -> (w, h), as the official --size."""
    m = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", s)
    if not m:
        raise ValueError(f"size {s!r}: write it as W*H, e.g. 832*480")
    return int(m[1]), int(m[2])


def check_video(frames, w, h, what):
    """Frames 4n+1 (VAE time stride 4) and sides multiples of 16 (VAE stride 8 x patch 2)."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"--frames {frames}: the VAE needs 4n+1 frames, e.g. 17, 33 or 81")
    if w % 16 or h % 16 or min(w, h) < 16:
        raise ValueError(f"{what} gives a {w}x{h} video: both sides must be multiples of 16 and at least 16")


def target_size(h0, w0, max_area):
    """The official I2V size: the image's aspect ratio at about max_area pixels, both sides
    rounded down to multiples of 16. A 1280x720 image at max_area 832*480 gives (h, w) = (464, 832)."""
    ar = h0 / w0
    lat_h = round(math.sqrt(max_area * ar) // 8 // 2 * 2)  # latent rows: // VAE stride, // patch, * patch
    lat_w = round(math.sqrt(max_area / ar) // 8 // 2 * 2)
    return 8 * lat_h, 8 * lat_w


def load_image(path):
    """An image file -> [3, h0, w0] fp32 in [-1, 1] (official: PIL RGB, to_tensor, (x - 0.5) / 0.5)."""
    try:
        a = iio.imread(path, plugin="pillow", mode="RGB")  # (h0, w0, 3) uint8
    except (OSError, ValueError):
        raise ValueError(f"cannot read the image {path}: give a PNG or JPEG file") from None
    return torch.from_numpy(a).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


@torch.no_grad()
def i2v_condition(vae, img, frames, h, w, progress=None):
    """The official I2V condition y [20, T_lat, h/8, w/8] fp32 for img [3, h0, w0] in [-1, 1].

    Channels 0-3: the mask, ones on latent frame 0 (the given frame) and zeros elsewhere. Channels 4-19: the
    normalised VAE latent of the image resized to (h, w) followed by frames-1 zero (mid-grey) frames; the
    zero frames really go through the VAE, so their latents are not zero.
    """
    img = F.interpolate(img[None].float().cpu(), size=(h, w), mode="bicubic", align_corners=False)  # CPU, as official
    video = torch.cat([img[:, :, None], torch.zeros(1, 3, frames - 1, h, w)], dim=2)  # (1, 3, F, h, w)
    lat = vae.encode(video.to(vae.conv1.weight.device), progress)[0]  # (16, T_lat, h/8, w/8)
    mask = torch.zeros_like(lat[:4])
    mask[:, 0] = 1
    return torch.cat([mask, lat])  # (20, T_lat, h/8, w/8)


def demo_config(ckpt_dir):
    """The "vpae_demo" entry of a checkpoint's config.json ({} if none): toy.py's demo names its student, size, ..."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        return json.load(f).get("vpae_demo", {})


def check_device(device):
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU (torch {torch.__version__}, CUDA "
                         f"{torch.version.cuda or 'none: a CPU-only build'}): pass --device cpu or install torch's CUDA build")


def ckpt_file(ckpt_dir, name):
    path = os.path.join(ckpt_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --ckpt_dir must hold the official Wan2.1 files (see README)")
    return path


def dtypes(device, name=None):
    """--dtype: bf16 is the official GPU set (DiT and umT5 bf16, CLIP fp16, VAE fp32), fp32 is fp32 throughout;
    None picks bf16 on CUDA and fp32 elsewhere."""
    if (name or ("bf16" if torch.device(device).type == "cuda" else "fp32")) == "fp32":
        return dict(dit=torch.float32, t5=torch.float32, clip=torch.float32, vae=torch.float32)
    return dict(dit=torch.bfloat16, t5=torch.bfloat16, clip=torch.float16, vae=torch.float32)


def load_encoders(ckpt_dir, model_type, device, dt):
    """T5, the VAE and, for i2v, CLIP from an official checkpoint directory (all files checked before any loads)."""
    t5, tok, vae = (ckpt_file(ckpt_dir, f) for f in (T5_FILE, TOKENIZER_DIR, VAE_FILE))
    clip = ckpt_file(ckpt_dir, CLIP_FILE) if model_type == "i2v" else None
    return (T5Encoder.from_pretrained(t5, tok, dt["t5"], device), WanVAE.from_pretrained(vae, dt["vae"], device),
            clip and CLIPVision.from_pretrained(clip, dt["clip"], device))


def load_dit(ckpt_dir, dtype, device, student=None, loras=()):
    """The checkpoint's DiT; with student, its weights come from that file and the teacher's are never read.
    loras: (file, scale) pairs, checked before anything loads, then added to each weight in turn as it loads, in
    fp32 before the cast to dtype: merged into weights already in bf16, a small update would round away."""
    if student is not None and not os.path.isfile(student):
        raise FileNotFoundError(f"--student {student} not found: give the student .safetensors file distill.py wrote")
    for path, _ in loras:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {path} not found: give a .safetensors LoRA file")
    updates = {}
    if loras:
        with torch.device("meta"):
            shapes = WanModel(load_config(ckpt_dir))  # names and shapes only
        for path, scale in loras:
            for name, u in lora_updates(shapes, path, scale).items():
                updates.setdefault(name, []).extend(u)
    edit = lambda name, w: with_updates(w.to(device), updates[name]) if name in updates else w  # noqa: E731
    return WanModel.from_pretrained(ckpt_dir, dtype, device, weights=student, edit=edit)


# -----------------------------------------------------------------------------
# LoRAs in the format of ComfyUI's Wan loader, read (lora_updates) and written (lora_state, for distill.py --export_lora): the original Wan names, with
# or without "diffusion_model.", each module's update under one of these suffixes

LORA_PARTS = {".lora_down.weight": "down", ".lora_A.weight": "down", ".lora_up.weight": "up", ".lora_B.weight": "up",
              ".alpha": "alpha", ".diff_b": "diff_b", ".diff": "diff"}


def lora_updates(dit, path, scale=1.0):
    """A LoRA file's updates {parameter name: [(factor, a, b)]}: W += scale * alpha / rank * up @ down for a pair (no
    alpha: alpha = rank), W += scale * diff, bias += scale * diff_b. Every key that fits no weight of dit (no such
    module, a wrong shape, half a pair) is named in one error. Only dit's names and shapes are read (meta will do)."""
    params, parts, bad = {k: tuple(p.shape) for k, p in dit.named_parameters()}, {}, []
    for key, t in read_safetensors(path):
        name = key.removeprefix("diffusion_model.")
        suffix = next((s for s in LORA_PARTS if name.endswith(s)), None)
        if suffix is None:
            bad.append(f"{key} (not a LoRA key)")
        else:
            parts.setdefault(name[:-len(suffix)], {})[LORA_PARTS[suffix]] = (key, t)
    todo = []  # (key, parameter, factor, a, b): the update is factor * a, or factor * a @ b for a pair
    for mod, p in parts.items():
        weight = f"{mod}.weight" if f"{mod}.weight" in params else mod  # a layer's weight, or a bare parameter
        if "down" in p and "up" in p:
            alpha = float(p["alpha"][1]) if "alpha" in p else p["down"][1].shape[0]
            todo.append((p["down"][0], weight, scale * alpha / p["down"][1].shape[0], p["up"][1], p["down"][1]))
        else:
            bad += [f"{k} (half a lora_down/lora_up pair)" for part, (k, _) in p.items() if part not in ("diff", "diff_b")]
        if "diff" in p:
            todo.append((p["diff"][0], weight, scale, p["diff"][1], None))
        if "diff_b" in p:
            todo.append((p["diff_b"][0], f"{mod}.bias", scale, p["diff_b"][1], None))

    def shape(a, b):  # the update's shape (None: a pair that does not multiply)
        if b is None:
            return tuple(a.shape)
        return (a.shape[0], b.shape[1]) if a.dim() == b.dim() == 2 and a.shape[1] == b.shape[0] else None
    bad += [f"{k} (no such weight)" if w not in params else f"{k} (an update of {shape(a, b)} for a weight of "
            f"{params[w]})" for k, w, _, a, b in todo if shape(a, b) != params.get(w)]
    if bad:
        more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError(f"--lora {path}: {len(bad)} key(s) fit no weight of this {dit.cfg.model_type} DiT: "
                         f"{'; '.join(bad[:8])}{more}. Is it a Wan2.1 LoRA of this checkpoint?")
    updates = {}
    for _, w, f, a, b in todo:
        updates.setdefault(w, []).append((f, a, b))
    return updates


@torch.no_grad()
def lora_state(teacher, student, rank, dtype=torch.bfloat16):
    """The student as a LoRA of the teacher, {key: tensor}, in the format of ComfyUI's Wan LoRA loader and diffusers'
    _convert_non_diffusers_wan_lora_to_diffusers: the original Wan names prefixed `diffusion_model.`.
    - each Linear of the blocks: `.lora_down.weight` and `.lora_up.weight` from a truncated SVD of (student -
      teacher) at rank min(rank, its sides), and `.alpha` = that rank (so the merge scale alpha / rank is 1);
    - each other Linear (text/time embeddings, time projection, head, image projection): the exact difference as
      a pair (the difference and an identity) without alpha: diffusers' converter reads these only as such pairs;
    - biases as `.diff_b`, every other changed parameter (norms, modulations, patch embedding) as `.diff`.
    A module with any changed parameter is written whole (diffusers reads head.head.diff only beside its diff_b)."""
    sd, t_params = {}, dict(teacher.named_parameters())
    for name, mod in student.named_modules():
        diffs = {k: p.float() - t_params[f"{name}.{k}"].float() for k, p in mod.named_parameters(recurse=False)}
        if not any(d.any() for d in diffs.values()):
            continue
        key = "diffusion_model." + name
        for k, d in diffs.items():
            if k == "bias":
                sd[key + ".diff_b"] = d
            elif k != "weight":  # a bare parameter: blocks.i.modulation, head.modulation, img_emb.emb_pos
                sd[f"{key}.{k}.diff"] = d
            elif not isinstance(mod, nn.Linear):
                sd[key + ".diff"] = d
            elif name.startswith("blocks."):
                dev = "cuda" if torch.cuda.is_available() else "cpu"  # 480 SVDs at 14B: on a GPU when there is one
                U, S, Vh = torch.linalg.svd(d.to(dev), full_matrices=False)
                r = min(rank, len(S))
                sd[key + ".lora_up.weight"] = (U[:, :r] * S[:r].sqrt()).cpu()  # (out, r)
                sd[key + ".lora_down.weight"] = (S[:r, None].sqrt() * Vh[:r]).cpu()  # (r, in)
                sd[key + ".alpha"] = torch.tensor(float(r))
            else:
                eye = torch.eye(min(d.shape))
                up, down = (eye, d) if d.shape[0] <= d.shape[1] else (d, eye)
                sd[key + ".lora_up.weight"], sd[key + ".lora_down.weight"] = up, down  # no alpha: scale 1
    return {k: v if k.endswith(".alpha") else v.to(dtype).contiguous() for k, v in sd.items()}


def with_updates(w, updates):
    """w + each update in turn, in fp32 on w's device (a new tensor)."""
    for f, a, b in updates:
        w = w.float() + f * (a.to(w.device).float() if b is None else a.to(w.device).float() @ b.to(w.device).float())
    return w


@torch.no_grad()
def merge_lora(dit, path, scale=1.0):
    """Add a LoRA file to a loaded DiT's weights (see lora_updates), nothing if any key fits no weight."""
    params = dict(dit.named_parameters())
    for name, u in lora_updates(dit, path, scale).items():
        params[name].copy_(with_updates(params[name], u).to(params[name].dtype))


def pack(tensors, pin=False):
    """{name: tensor} -> (one uint8 buffer holding them all at 64-byte aligned offsets, pinned if pin; its layout)."""
    layout, n = [], 0
    for k, t in tensors.items():
        layout.append((k, n, t.dtype, t.shape))
        n += -(-t.nbytes // 64) * 64
    buf = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    for k, t in unpack(buf, layout).items():
        t.copy_(tensors[k])
    return buf, layout


def unpack(buf, layout):
    """The tensors of a packed buffer (or of its copy on a device): views of it."""
    return {k: buf[o:o + dt.itemsize * math.prod(shape)].view(dt).view(shape) for k, o, dt, shape in layout}


class BlockStream:
    """--offload blocks: the DiT's blocks wait in CPU memory, each packed into one pinned buffer (pinning rounds each
    allocation up to a power of two, so one per block, not one per tensor), and each is copied to the device in one
    piece just before it runs, on a side stream while the block before it computes, then dropped. At most two blocks
    are on the device: the host, which runs ahead of the GPU, queues block i+1's copy only once block i-1 has
    finished, as an event recorded on the compute stream after each block tells it. On a CPU the same code runs
    with plain copies and no streams. streams: (copy stream, compute stream); on CUDA by default a side stream and
    the current one; tests pass fakes."""

    def __init__(self, dit, device, streams=None):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda and streams is None:
            streams = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        self.side, self.compute = streams or (None, None)
        self.blocks, self.home, self.ready, self.last = dit.blocks, [], {}, None  # last: after the last block to run
        for i, block in enumerate(self.blocks):
            self.home.append(pack(block.state_dict(), pin=cuda))
            self.place(block, None)
            block.register_forward_pre_hook(lambda mod, args, i=i: self.enter(i))
            block.register_forward_hook(lambda mod, args, out: self.leave(mod))

    @staticmethod
    def place(block, weights):
        """Point the block's parameters at weights {name: tensor}, or at empty placeholders (None)."""
        for name, p in list(block.named_parameters()):
            mod, _, leaf = name.rpartition(".")
            t = torch.empty(0, dtype=p.dtype) if weights is None else weights[name]
            block.get_submodule(mod)._parameters[leaf] = nn.Parameter(t, requires_grad=False)

    def fetch(self, i):
        """Start copying block i to the device, unless it is there or on its way."""
        if i < len(self.blocks) and i not in self.ready:
            if self.last is not None:  # the block before the one now entering: once it is done, its memory is free
                self.last.synchronize()  # (so no record_stream: the side stream allocates only after this)
                self.last = None
            buf, layout = self.home[i]
            with torch.cuda.stream(self.side) if self.device.type == "cuda" else contextlib.nullcontext():
                buf = buf.to(self.device, non_blocking=True, copy=True)
            self.ready[i] = unpack(buf, layout), self.side.record_event() if self.side is not None else None

    def enter(self, i):
        self.fetch(i)  # block 0 of each call: nothing to overlap with
        weights, copied = self.ready.pop(i)
        if copied is not None:
            self.compute.wait_event(copied)  # the block's compute waits for its copy
        self.place(self.blocks[i], weights)
        self.fetch(i + 1)  # overlaps with block i

    def leave(self, block):
        self.place(block, None)
        if self.compute is not None:
            self.last = self.compute.record_event()


# -----------------------------------------------------------------------------
# samplers (README: "How V-PAE works", Inference); x_sigma = (1 - sigma) x0 + sigma eps, the DiT predicts v = eps - x0


def shift_sigma(s, shift):
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def sample_student(dit, noise, cond, steps, shift, gen):
    """x0 = x - sigma_k v(x, 1000 sigma_k) at sigma_k = shift(1 - k/N), re-noised with fresh noise to sigma_k+1.
    One step is x0 = eps - v(eps, 1000): the distilled generator. Timesteps stay float (t = 1000 sigma)."""
    sigmas = [shift_sigma(1 - k / steps, shift) for k in range(steps)] + [0.0]
    x = noise
    for k in bar(range(steps), "DiT"):
        x0 = x - sigmas[k] * dit(x, torch.full((1,), 1000 * sigmas[k], device=x.device), **cond)
        eps = torch.randn(noise.shape, generator=gen).to(x.device) if sigmas[k + 1] > 0 else 0
        x = (1 - sigmas[k + 1]) * x0 + sigmas[k + 1] * eps
    return x


@torch.no_grad()
def sample_teacher(dit, noise, cond, neg_context, steps, shift, guide):
    """The baseline: Euler on the flow ODE dx/dsigma = v with CFG, v = v_neg + g (v_cond - v_neg), two batch-1
    forwards per step as official. Grid: official dpm++'s shift(linspace(1, 0, N+1)), which starts at sigma 1
    (UniPC's starts at 0.999); timesteps int64(1000 sigma), truncated as official."""
    sigmas = [shift_sigma(1 - k / steps, shift) for k in range(steps + 1)]
    x = noise
    for k in bar(range(steps), "DiT"):
        t = torch.full((1,), int(1000 * sigmas[k]), device=x.device)
        v_neg = dit(x, t, **{**cond, "context": neg_context})
        v = v_neg + guide * (dit(x, t, **cond) - v_neg)
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    return x


def write_video(video, path):
    """[3, F, H, W] in [-1, 1] -> H.264 mp4 at 16 fps (official: clamp, (x + 1) / 2 * 255, uint8)."""
    save_mp4(((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy(), path)


def save_mp4(frames, path):
    """uint8 [F, H, W, 3] -> mp4, written under a temporary name and then renamed into place."""
    tmp = path + ".tmp.mp4"
    with imageio.get_writer(tmp, fps=FPS, codec="libx264", quality=8, macro_block_size=16) as w:  # official quality
        for f in frames:
            w.append_data(f)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# main


def prepare(args):
    """Check the request and load the models. Every error a user can cause is raised here, before any compute."""
    check_device(args.device)
    if args.ckpt_dir is None:
        if not os.path.isdir(DEFAULT_CKPT):
            raise ValueError("no --ckpt_dir given: pass an official Wan2.1 checkpoint directory, e.g. "
                             "--ckpt_dir Wan2.1-I2V-14B-480P")
        args.ckpt_dir = DEFAULT_CKPT
        log(f"using the bundled demo model {DEFAULT_CKPT} (tiny, moving shapes only); "
            "for real videos pass --ckpt_dir with the official Wan2.1 weights")
    cfg, demo = load_config(args.ckpt_dir), demo_config(args.ckpt_dir)
    if demo.get("student") and args.student is None and not args.teacher and not args.lora:  # a LoRA: onto the teacher
        args.student = os.path.join(args.ckpt_dir, demo["student"])
    for k, official in (("prompt", ""), ("frames", 81), ("size", "832*480"), ("shift", None), ("guide_scale", 5.0)):
        if getattr(args, k) is None:
            setattr(args, k, demo.get(k, official))
    if demo.get("prompt") == args.prompt:
        log(f'prompt: "{args.prompt}" (the demo\'s; it knows "a <colour> <shape> moving <up|down|left|right>")')
    model_type, world = cfg.model_type, dist.get_world_size() if dist.is_initialized() else 1
    if cfg.num_heads % world:
        raise ValueError(f"{world} ranks cannot split the {cfg.num_heads} attention heads: use a divisor of it")
    if model_type not in ("t2v", "i2v"):
        raise ValueError(f"{args.ckpt_dir} is a {model_type} checkpoint: sample.py runs t2v and i2v ones")
    if model_type == "t2v" and args.image:
        raise ValueError(f"{args.ckpt_dir} is a t2v checkpoint, so it takes no --image: drop it or use an i2v one")
    if model_type == "i2v" and not args.image:
        raise ValueError(f"{args.ckpt_dir} is an i2v checkpoint: pass the first frame with --image")
    if model_type == "t2v" and not args.prompt:
        raise ValueError("text-to-video needs --prompt")
    if args.teacher and args.student:
        raise ValueError("--teacher runs the checkpoint's own DiT: drop --student (or --teacher)")
    args.steps = (50 if args.teacher else 1) if args.steps is None else args.steps
    if args.steps < 1 or (args.tile is not None and args.tile <= 8):
        raise ValueError("--steps must be at least 1 and --tile (latent pixels, 8 of them overlap) more than 8")
    w, h = parse_size(args.size)
    img = None
    if args.image:
        img = load_image(args.image)
        h, w = target_size(img.shape[1], img.shape[2], w * h)
        if parse_size(args.size) != (w, h):
            log(f"--size {args.size} at the shape of {args.image} ({img.shape[2]}x{img.shape[1]}): {w}x{h}, "
                "the image's aspect ratio at about that area, both sides multiples of 16")
    check_video(args.frames, w, h, f"--size {args.size}" + (f" at the shape of {args.image}" if args.image else ""))
    if args.shift is None:  # official defaults: i2v 3.0 at the 480P sizes, else 5.0; t2v 5.0
        args.shift = 3.0 if model_type == "i2v" and parse_size(args.size) in SIZES_480P else 5.0
    loras = [parse_lora(a) for a in args.lora or []]
    if args.out is None:
        stem = os.path.splitext(os.path.basename(args.image or ""))[0] + "_" + args.prompt[:48]
        stem = re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_") or "video"
        lora = "".join("_" + os.path.splitext(os.path.basename(path))[0] for path, _ in loras)
        args.out = f"{stem}_{'teacher' if args.teacher else 'student'}{args.steps}{lora}_seed{args.seed}.mp4"
    if not args.out.endswith(".mp4"):
        raise ValueError(f"--out {args.out}: the video is written as .mp4, so name it so")
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out} already exists: pass --overwrite or another --out")
    log("DiT weights: " + (args.student or f"{args.ckpt_dir} (the teacher)") +
        "".join(f" + LoRA {path} x {scale:g}" for path, scale in loras))

    dt = dtypes(args.device, args.dtype)
    home = "cpu" if args.offload else args.device  # --offload: models wait in CPU memory
    if args.student is None:
        weight_files(args.ckpt_dir)  # the DiT's files exist (a missing one is named) before anything loads
    t0 = time.time()
    t5, vae, clip = load_encoders(args.ckpt_dir, model_type, home, dt)
    models = dict(t5=t5, vae=vae, clip=clip, dit=load_dit(args.ckpt_dir, dt["dit"], home, args.student, loras))
    if args.offload == "blocks":
        BlockStream(models["dit"], args.device)
    return models, dict(model_type=model_type, w=w, h=h, img=img, load_s=time.time() - t0)


def generate(args, models, model_type, w, h, img, load_s):
    """Text, image, DiT and VAE stages in turn; T5, CLIP and the DiT leave `models` after their stage (freed)."""
    device, times, vae = torch.device(args.device), {"load": load_s}, models["vae"]
    T = (args.frames - 1) // 4 + 1
    log(f"{model_type}: {args.frames} frames at {w}x{h} (latent {T}x{h // 8}x{w // 8}, {T * h * w // 256} tokens), "
        f"{'teacher' if args.teacher else 'student'} {args.steps} step(s), shift {args.shift}, seed {args.seed}")

    def stage(name, model, fn):
        """fn(model) with model on the device (with --offload only for this stage); adds up each stage's time."""
        t0 = time.time()
        out = fn(model.to(device))
        if args.offload:
            model.to("cpu")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        times[name] = times.get(name, 0) + time.time() - t0
        return out

    neg = args.negative_prompt or (I2V_NEG_PREFIX if model_type == "i2v" else "") + NEG_PROMPT  # "" too, as official
    ctx = stage("text", models.pop("t5"), lambda t5: [c[None] for c in t5.encode([args.prompt] + [neg] * args.teacher)])
    cond = {"context": ctx[0]}
    if img is not None:  # CLIP sees the original image, the VAE the resized one
        cond["clip_fea"] = stage("image", models.pop("clip"), lambda clip: clip.encode_image(img[None].to(device)))
        progress = lambda it: bar(it, "VAE enc")  # noqa: E731
        cond["y"] = stage("image", vae, lambda vae: i2v_condition(vae, img, args.frames, h, w, progress)[None])

    gen = torch.Generator().manual_seed(args.seed)  # on the CPU: the same noise on any device
    noise = torch.randn(1, 16, T, h // 8, w // 8, generator=gen).to(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dit = models.pop("dit")
    dit.sp_group = dist.group.WORLD if world > 1 else None
    if args.teacher:
        x0 = stage("DiT", dit, lambda d: sample_teacher(d, noise, cond, ctx[1], args.steps, args.shift,
                                                        args.guide_scale))
    else:
        x0 = stage("DiT", dit, lambda d: sample_student(d, noise, cond, args.steps, args.shift, gen))
    del dit

    if world == 1 or dist.get_rank() == 0:  # every rank holds the same x0; one decodes and writes
        vae.to(dtype=VAE_DTYPES[args.vae_dtype])  # the decode only: bf16 encoding hurts the I2V condition
        video = stage("VAE decode", vae, lambda vae: vae.decode(x0, lambda it: bar(it, "VAE dec"), args.tile)[0])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_video(video, args.out)
        total = sum(times.values())
        log("time: " + " | ".join(f"{k} {v:.1f}s" for k, v in times.items()) +
            f" | total {total:.1f}s, {total - times['VAE decode']:.1f}s without the VAE decode")
        log(f"wrote {args.out} ({args.frames} frames, {w}x{h}, {FPS} fps)")
    return args.out


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", help="official Wan2.1 checkpoint directory (default: the bundled demo, if present)")
    p.add_argument("--image", help="I2V: the first frame (PNG/JPEG); leave out for T2V")
    p.add_argument("--prompt", help="the text prompt")
    p.add_argument("--student", help="a distilled DiT: one .safetensors file with official key names")
    p.add_argument("--steps", type=int, help="DiT steps (default 1: the one-step student; 50 with --teacher)")
    p.add_argument("--teacher", action="store_true", help="the baseline: the checkpoint's DiT, Euler ODE with CFG")
    p.add_argument("--guide_scale", type=float, help="CFG scale of --teacher (default 5.0, or the demo's)")
    p.add_argument("--negative_prompt", help="CFG negative prompt (default: Wan's, with the I2V prefix for I2V)")
    p.add_argument("--shift", type=float, help="sigma shift (default: i2v 3.0 at 832*480 / 480*832, else 5.0)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--frames", type=int, help="number of frames, 4n+1 (default 81: 5 s at 16 fps)")
    p.add_argument("--size", help="W*H (default 832*480); I2V: the area, at the image's shape")
    p.add_argument("--out", help="output .mp4 (default: named after the image, prompt, sampler and seed)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="merge a Wan LoRA into the DiT at load "
                   "(scale default 1; repeatable), e.g. distill.py --export_lora's, or a 4-step one with --steps 4")
    p.add_argument("--offload", nargs="?", const="models", choices=["models", "blocks"],
                   help="keep each model on the GPU only while it runs; 'blocks': also stream the DiT's blocks from "
                   "pinned CPU memory, one ahead of the compute (14B in one step on a small GPU)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16: the official GPU dtypes (DiT and umT5 bf16, "
                   "CLIP fp16, VAE encode fp32); fp32 throughout (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--vae_dtype", default="fp32", choices=list(VAE_DTYPES),
                   help="the VAE decode's dtype (default fp32; encoding stays fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    p.add_argument("--tile", type=int, help="VAE decode in spatial tiles of this many latent pixels (e.g. 32)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # torchrun: every rank builds the same condition and noise; the DiT splits its tokens over the ranks
        # (Ulysses: num_heads must divide by the world size); rank 0 decodes and writes.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
    try:
        models, plan = prepare(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: error: {e}") from None
    with torch.inference_mode():
        out = generate(args, models, **plan)
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
