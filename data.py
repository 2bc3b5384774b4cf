"""Training data for distill.py: captioned videos -> precomputed latents and conditions in safetensors shards,
plus a synthetic moving-shapes source for the tests and the demo.

  python data.py --synthetic 64 --out shapes/                                   # mp4s + captions.jsonl
  python data.py --ckpt_dir Wan2.1-I2V-14B-480P --videos shapes/ --out latents/  # shards + manifest.json
  torchrun --nproc_per_node=8 data.py --ckpt_dir ... --videos ... --out ...      # the clips split over 8 ranks

A video folder holds videos (.mp4 .mov .m4v .mkv .webm .avi .gif, and .mpg .wmv .flv .3gp .ts .mts) and their
captions: captions.jsonl lines {"file", "caption"}, or a .txt beside each video; other files are named as ignored.
Clips are sampled at 16 fps, scaled to cover --size and centre-cropped. A precomputed folder holds manifest.json,
neg_context.safetensors and shard_*.safetensors with, per clip, `{id}.latent` [16, T, h, w], `{id}.context`
[L, 4096] and, for i2v, `{id}.y` [20, T, h, w] and `{id}.clip` [257, 1280].
"""
import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings

import imageio.v2 as imageio
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
from model import load_config

VIDEO_EXTS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts",
              ".mts", ".m2ts")  # what the bundled ffmpeg reads that people keep video in
# imageio-ffmpeg's warning for a clip with rotation metadata: harmless, ffmpeg applies the rotation, so the size read
# is the size displayed (the source size swapped), which is the frame we want
ROTATED = re.compile(r"The frame size for reading \((\d+), (\d+)\) is different from the source frame size "
                     r"\(\2, \1\)\.")
SHARD_CLIPS = 64  # clips per safetensors shard

# -----------------------------------------------------------------------------
# synthetic clips: one coloured shape moving at constant speed on a plain background

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 205, 40),
           "purple": (150, 60, 200), "white": (240, 240, 240)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards


def caption(shape, colour, direction):
    return f"a {colour} {shape} moving {direction}"


def synthetic_clip(shape, colour, direction, frames, h, w, rng):
    """uint8 [F, H, W, 3]: the shape (half size 0.15 min(H, W)) crosses half the room it has along `direction`
    at constant speed, from a random start (rng: a numpy Generator) that keeps it inside the frame."""
    r, (dx, dy) = 0.15 * min(h, w), DIRECTIONS[direction]
    centre = []
    for d, extent in ((dx, w), (dy, h)):
        lo, hi = r, extent - r
        if d == 0:
            centre.append(np.full(frames, rng.uniform(lo, hi)))
        else:
            travel = (hi - lo) / 2
            start = rng.uniform(lo, hi - travel) if d > 0 else rng.uniform(lo + travel, hi)
            centre.append(start + d * travel * np.arange(frames) / max(frames - 1, 1))
    cx, cy = (c[:, None, None] for c in centre)  # (F, 1, 1) each
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    if shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        inside = np.maximum(abs(xx - cx), abs(yy - cy)) <= 0.85 * r
    else:  # apex up, base 2r wide
        inside = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - cy + r) / 2)
    bg = np.full(3, rng.integers(10, 70), dtype=np.uint8)  # a dark grey
    return np.where(inside[..., None], np.array(COLOURS[colour], dtype=np.uint8), bg)  # (F, H, W, 3)


def write_synthetic(n, out, frames=17, size="64*64", seed=0, overwrite=False):
    """n random clips as mp4s plus captions.jsonl in `out`, the video-folder format precompute reads."""
    w, h = sample.parse_size(size)
    sample.check_video(frames, w, h, f"--size {size}")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{out} is not empty: choose another --out or pass --overwrite")
    os.makedirs(out, exist_ok=True)
    rng, lines = np.random.default_rng(seed), []
    for i in range(n):
        s, c, d = (names[rng.integers(len(names))] for names in (SHAPES, list(COLOURS), list(DIRECTIONS)))
        name = f"clip_{i:05d}.mp4"
        sample.save_mp4(synthetic_clip(s, c, d, frames, h, w, rng), os.path.join(out, name))
        lines.append(json.dumps({"file": name, "caption": caption(s, c, d)}))
    write_text("\n".join(lines) + "\n", os.path.join(out, "captions.jsonl"))
    print(f"wrote {n} clips ({frames} frames, {w}x{h}) and captions.jsonl to {out}")
    return out


# -----------------------------------------------------------------------------
# reading a video folder


class Skip(Exception):
    """A clip that cannot be used: args = (reason, detail); reason is a key of the manifest's "skipped"."""


class NoClips(ValueError):
    """A video folder with nothing to encode: no videos, or no captioned ones. Raised before anything is written;
    other frames or sizes would not help (unlike precompute's "no usable clip")."""


def list_clips(videos):
    """[(file relative to videos, caption)] from captions.jsonl, else from the .txt beside each video; the videos
    that have no caption; and the files that are neither videos (VIDEO_EXTS) nor captions."""
    files = sorted(os.path.relpath(os.path.join(d, f), videos) for d, _, fs in os.walk(videos) for f in fs)
    vids = [f for f in files if f.lower().endswith(VIDEO_EXTS)]
    jl, clips = os.path.join(videos, "captions.jsonl"), []
    if os.path.isfile(jl):
        with open(jl, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    d = json.loads(line) if line.strip() else None
                    clips += [(d["file"], str(d["caption"]))] if d is not None else []
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f'{jl} line {n} is not a JSON object with "file" and "caption": fix it') from None
    else:
        for f in vids:
            txt = os.path.join(videos, os.path.splitext(f)[0] + ".txt")
            if os.path.isfile(txt):
                with open(txt, encoding="utf-8") as fh:
                    clips.append((f, fh.read().strip()))
    named = {os.path.normpath(f) for f, _ in clips}
    known = named.union(vids, ["captions.jsonl"], (os.path.splitext(f)[0] + ".txt" for f in vids))  # the rest: ignored
    return clips, [f for f in vids if f not in named], [f for f in files if f not in known]


def namelist(files, k=20):
    """The first k names, for a one-line summary."""
    return ", ".join(files[:k]) + (f" and {len(files) - k} more" if len(files) > k else "")


@contextlib.contextmanager
def reader_notes():
    """Collect what the readers warn while a clip is read (warnings.warn, imageio-ffmpeg's log), each message once
    and ROTATED dropped, to print against the clip's name instead of as loose lines between the progress lines."""
    notes, log = {}, logging.getLogger("imageio_ffmpeg")  # notes: message -> None, a set in order

    def note(msg):
        if not ROTATED.fullmatch(msg):
            notes[msg] = None

    def collect(record):  # a filter on the logger: a warning is noted, not printed
        if record.levelno < logging.WARNING:
            return True
        note(record.getMessage())
        return False

    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: note(str(message))
        log.addFilter(collect)
        try:
            yield notes
        finally:
            log.removeFilter(collect)


def read_frames(path, frames):
    """The first `frames` frames resampled to 16 fps, uint8 [F, H, W, 3]: output frame k is source frame
    floor(k * fps / 16), with fps from the reader's metadata (GIFs: 1000 / frame duration in ms)."""
    if not os.path.isfile(path):
        raise Skip("missing", "no such file")
    reader = None
    try:  # anything a broken file raises (OSError, RuntimeError, ...) skips the clip: one bad file must not stop a run
        # imageio picks its reader by the name and its ffmpeg reader lists only some video extensions (no .m4v, .ts,
        # ...): naming the format .mp4 gets it for every video, and ffmpeg reads the content whatever the name.
        # GIFs keep imageio's own reader, which has each frame's duration.
        reader = imageio.get_reader(path, format=None if path.lower().endswith(".gif") else ".mp4")
        meta = reader.get_meta_data()
        fps = meta.get("fps") or (1000 / meta["duration"] if meta.get("duration") else sample.FPS)
        want = [int(k * fps / sample.FPS + 1e-6) for k in range(frames)]
        need, got, n = set(want), {}, 0
        for n, frame in enumerate(reader, 1):
            if n - 1 in need:
                got[n - 1] = frame
            if n > want[-1]:
                break
        if want[-1] not in got:  # args[2]: what the clip has, to suggest --frames and --size
            fit = (math.ceil(n * sample.FPS / fps - 1e-6), *rgb(frame).shape[1::-1]) if n else None
            raise Skip("too_short", f"{n} frames at {fps:g} fps; {frames} frames at 16 fps need {want[-1] + 1}", fit)
        return np.stack([rgb(got[i]) for i in want])
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001
        raise Skip("unreadable", (str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    finally:
        if reader is not None:
            reader.close()


def rgb(a):
    """A frame as (H, W, 3): grey is repeated, alpha dropped."""
    a = np.asarray(a)
    return np.repeat(a[..., None], 3, -1) if a.ndim == 2 else np.broadcast_to(a[..., :3], (*a.shape[:2], 3))


def resize_crop(frames, w, h):
    """uint8 [F, H0, W0, 3] -> [3, F, h, w] fp32 in [-1, 1]: scaled (antialiased) to cover w x h, centre crop."""
    H0, W0 = frames.shape[1:3]
    s = max(h / H0, w / W0)
    rh, rw = max(h, round(H0 * s)), max(w, round(W0 * s))
    x = torch.cat([F.interpolate(torch.from_numpy(frames[i:i + 8]).permute(0, 3, 1, 2).float(), size=(rh, rw),
                                 mode="bilinear", antialias=True, align_corners=False)
                   for i in range(0, len(frames), 8)])  # (F, 3, rh, rw), 8 frames at a time to bound memory
    top, left = (rh - h) // 2, (rw - w) // 2
    x = x[:, :, top:top + h, left:left + w] / 127.5 - 1
    return x.clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # (3, F, h, w)


# -----------------------------------------------------------------------------
# precompute


def atomic(path, write):
    """write(tmp) then rename over path: a crash never leaves a half-written file under the real name."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def write_text(text, path):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic(path, write)


def write_json(obj, path):
    write_text(json.dumps(obj, ensure_ascii=False, indent=1), path)


def is_precomputed(path):
    return os.path.isfile(os.path.join(path, "manifest.json"))


def read_manifest(out):
    """manifest.json with the clips and skips of any part_<rank>.json that a run of ranks has not merged yet
    (clips ordered by id, each file once; skipped lists sorted), or None."""
    if not is_precomputed(out):
        return None
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
        man = json.load(fh)
    seen, new, skipped = {c["file"] for c in man["clips"]}, {}, man["skipped"]
    for part in parts(out):
        with open(os.path.join(out, part), encoding="utf-8") as fh:
            p = json.load(fh)
        new |= {c["file"]: c for c in p["clips"] if c["file"] not in seen}
        for k, v in p["skipped"].items():
            skipped[k] = sorted(set(skipped.get(k, [])) | set(v))
    man["clips"] += sorted(new.values(), key=lambda c: int(c["id"]))
    return man


def parts(out):
    return [f for f in os.listdir(out) if f.startswith("part_") and f.endswith(".json")]


@torch.no_grad()
def precompute(ckpt_dir, videos, out, frames=None, size=None, device="cpu", dtype=None, group=None):
    """Encode every captioned clip of `videos` into shards under `out` and return out. Resumable: clips already
    in out/manifest.json are not redone. frames and size default to the checkpoint's demo ones (assets/demo: 17,
    64*64), else 81 and 832*480. dtype overrides the T5/CLIP dtype (default: official on a GPU, fp32 on a CPU);
    the VAE always runs in fp32. Raises ValueError when no clip is usable.

    Under torch.distributed (torchrun, or distill.py's ranks) every rank calls it: rank r encodes clips r, r + world,
    ... into its own shards, listed in out/part_<r>.json after each shard, and rank 0 merges the parts into
    manifest.json at the end, in the order one process would have written. The ranks wait for each other on
    `group` (default: the default group): its timeout must allow for the slowest rank's share. A clip's id is its place in the list of
    clips still to do, after the largest id already used, so shard names (its first clip's id) never collide."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    barrier = (lambda: dist.barrier(group)) if world > 1 else lambda: None
    sample.check_device(device)
    model_type, demo = load_config(ckpt_dir).model_type, sample.demo_config(ckpt_dir)
    frames, size = frames or demo.get("frames", 81), size or demo.get("size", "832*480")
    w, h = sample.parse_size(size)
    sample.check_video(frames, w, h, f"size {size}")
    if not os.path.isdir(videos):
        raise FileNotFoundError(f"video folder {videos} not found: pass a folder of captioned videos")
    if model_type not in ("t2v", "i2v"):
        raise ValueError(f"{ckpt_dir} is a {model_type} checkpoint: precompute supports t2v and i2v")
    clips, uncaptioned, ignored = list_clips(videos)
    if not clips:  # before out is made or an encoder loaded: nothing here could ever be encoded
        if uncaptioned:
            how = ("add a line for each to captions.jsonl" if os.path.isfile(os.path.join(videos, "captions.jsonl"))
                   else 'add captions.jsonl lines {"file", "caption"} or a .txt caption beside each video')
            raise NoClips(f"no captioned videos in {videos}: {len(uncaptioned)} video(s) have no caption "
                          f"({namelist(uncaptioned, 5)}); {how}")
        found = f"; found only {namelist(ignored, 5)}" if ignored else ""
        raise NoClips(f"no videos in {videos} (looked for {', '.join(VIDEO_EXTS)}){found}: pass a folder of captioned "
                      "videos")
    man_path, neg_path = os.path.join(out, "manifest.json"), os.path.join(out, "neg_context.safetensors")
    head, man = {"model_type": model_type, "frames": frames, "size": f"{w}*{h}"}, read_manifest(out)
    anew = man is None or ({k: man.get(k) for k in head} != head and not man["clips"])  # nothing usable kept
    if man is None and os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty and has no manifest.json: precompute into an empty or new --out")
    if not anew and {k: man.get(k) for k in head} != head:
        raise ValueError(f"{out} holds {man.get('model_type')} clips of {man.get('frames')} frames at "
                         f"{man.get('size')}, not {model_type} {frames} at {w}*{h}: precompute into another --out")
    barrier()  # every rank has read the folder before rank 0 changes it
    if anew and rank == 0:
        os.makedirs(out, exist_ok=True)
        for f in parts(out) + ["neg_context.safetensors"] * os.path.isfile(neg_path):  # a run at other settings
            os.remove(os.path.join(out, f))
        write_json({**head, "clips": [], "skipped": {}}, man_path)
    barrier()
    man = read_manifest(out)
    done = {c["file"] for c in man["clips"]} | {f for k, fs in man["skipped"].items() if k != "no_caption" for f in fs}
    todo = [(f, cap) for f, cap in clips if f not in done]
    base = 1 + max((int(c["id"]) for c in man["clips"]), default=-1)
    mine = list(enumerate(todo))[rank::world]  # (place in todo, (file, caption))
    if rank == 0:
        if ignored:
            print(f"ignored {len(ignored)} file(s) that are not videos or captions: {namelist(ignored)}")
        if uncaptioned:
            print(f"skipped {len(uncaptioned)} video(s) that have no caption: {namelist(uncaptioned)}")
        print(f"{len(todo)} clips to encode at {frames} frames, {w}*{h} ({len(man['clips'])} already in {out})"
              + (f", over {world} ranks" if world > 1 else ""))
    part_path = os.path.join(out, f"part_{rank}.json")
    part = {"clips": [], "skipped": {}}
    if os.path.isfile(part_path):  # this rank's part of a run that stopped early: kept, extended
        with open(part_path, encoding="utf-8") as fh:
            old = json.load(fh)
        part["clips"] = old["clips"]
        for k, v in old["skipped"].items():
            part["skipped"][k] = part["skipped"].get(k, []) + v
    fits = []  # what the too-short clips have
    if mine or (rank == 0 and not os.path.isfile(neg_path)):
        dt = sample.dtypes(device)
        if dtype is not None:
            dt.update(t5=dtype, clip=dtype)
        t5, vae, clip = sample.load_encoders(ckpt_dir, model_type, device, dt)
        if rank == 0 and not os.path.isfile(neg_path):
            neg = (sample.I2V_NEG_PREFIX if model_type == "i2v" else "") + sample.NEG_PROMPT
            atomic(neg_path, lambda f: save_file({"context": t5.encode([neg])[0].float().cpu().contiguous()}, f))
        tensors, pending = {}, []

        def flush():  # one shard, then the part that names it: a crash loses at most the clips of one shard
            shard = f"shard_{int(pending[0]['id']):05d}.safetensors"
            atomic(os.path.join(out, shard), lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p))
            part["clips"] += [{**c, "shard": shard} for c in pending]
            write_json(part, part_path)
            tensors.clear()
            pending.clear()

        said = lambda notes: "".join(f"; the reader says: {n}" for n in notes)  # noqa: E731
        for i, (j, (f, cap)) in enumerate(mine, 1):
            t0 = time.time()
            try:
                with reader_notes() as notes:
                    video = resize_crop(read_frames(os.path.join(videos, f), frames), w, h)  # (3, F, h, w)
            except Skip as e:
                part["skipped"].setdefault(e.args[0], []).append(f)
                fits += [a for a in e.args[2:] if a]
                print(f"[{i}/{len(mine)}] {f}: skipped, {e.args[0]} ({e.args[1]}){said(notes)}", flush=True)
                continue
            cid = f"{base + j:06d}"  # the manifest maps it to the file
            tensors[f"{cid}.latent"] = vae.encode(video[None].to(device))[0].cpu()  # (16, T, h/8, w/8) fp32
            tensors[f"{cid}.context"] = t5.encode([cap])[0].cpu().clone()  # (L, 4096) as computed; clone: a view of 512
            if model_type == "i2v":  # the first frame is the condition, as official builds it
                tensors[f"{cid}.y"] = sample.i2v_condition(vae, video[:, 0], frames, h, w).cpu()
                tensors[f"{cid}.clip"] = clip.encode_image(video[None, :, 0].to(device))[0].cpu()
            pending.append({"id": cid, "caption": cap, "file": f})
            print(f"[{i}/{len(mine)}] {f}: {time.time() - t0:.1f}s{said(notes)}", flush=True)
            if len(pending) == SHARD_CLIPS:
                flush()
        if pending:
            flush()
    write_json(part, part_path)
    barrier()
    if rank == 0:  # merge the parts into the manifest, then drop them
        man = read_manifest(out)
        man["skipped"].pop("no_caption", None)
        if uncaptioned:  # the folder as it is now: a video captioned since an earlier run has been encoded above
            man["skipped"]["no_caption"] = uncaptioned
        write_json(man, man_path)
        for f in parts(out):
            os.remove(os.path.join(out, f))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, fits, group)  # also waits for the merge
        fits = sum(gathered, [])
    man = read_manifest(out)
    counts = ", ".join(f"{k} {len(v)}" for k, v in man["skipped"].items() if v) or "none"
    if rank == 0:
        print(f"{len(man['clips'])} clips in {out}; skipped: {counts}")
    if not man["clips"]:
        hint = ""
        if fits:
            n, w0, h0 = max(fits)
            hint = (f"; the longest is {n} frames at 16 fps, {w0}*{h0}: pass --frames {(n - 1) // 4 * 4 + 1} or fewer "
                    f"(4n+1) and a --size such as {max(16, w0 // 16 * 16)}*{max(16, h0 // 16 * 16)}")
        raise ValueError(f"no usable clip in {videos} at {frames} frames (skipped: {counts}){hint}")
    return out


# -----------------------------------------------------------------------------
# training-time reading


class LatentDataset(torch.utils.data.Dataset):
    """The clips precomputed under root, as fp32 tensors; shards are opened lazily and their handles cached."""

    def __init__(self, root):
        path = os.path.join(root, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: precompute the clips first "
                                    f"(python data.py --ckpt_dir CKPT --videos VIDEOS --out {root})")
        with open(path, encoding="utf-8") as fh:
            man = json.load(fh)
        self.root, self.clips, self.model_type = root, man["clips"], man["model_type"]
        self.frames, self.size = man["frames"], man["size"]
        neg = os.path.join(root, "neg_context.safetensors")
        if not os.path.isfile(neg):
            raise FileNotFoundError(f"{neg} not found: rerun data.py on {root} to finish the precompute")
        self.neg_context = load_file(neg)["context"].float()  # (L, text_dim)
        self.handles = {}

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        c = self.clips[i]
        if c["shard"] not in self.handles:
            self.handles[c["shard"]] = safe_open(os.path.join(self.root, c["shard"]), framework="pt")
        f = self.handles[c["shard"]]
        keys = ("latent", "context", "y", "clip") if self.model_type == "i2v" else ("latent", "context")
        return {k: f.get_tensor(f"{c['id']}.{k}").float() for k in keys}

    def __getstate__(self):  # open handles do not pickle (DataLoader workers); they are reopened on demand
        return {**self.__dict__, "handles": {}}


def collate(items):
    """Stack samples; contexts are zero-padded to the longest, which is what the DiT does up to text_len anyway."""
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "context"}
    L = max(it["context"].shape[0] for it in items)
    out["context"] = torch.stack([F.pad(it["context"], (0, 0, 0, L - it["context"].shape[0])) for it in items])
    return out


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, metavar="N", help="write N moving-shapes clips to --out")
    p.add_argument("--ckpt_dir", help="official Wan2.1 checkpoint directory (for precompute)")
    p.add_argument("--videos", help="folder of captioned videos to precompute")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--frames", type=int, help="frames per clip at 16 fps, 4n+1 (default 81 or the demo's; synthetic 17)")
    p.add_argument("--size", help="W*H (default 832*480 or the demo's; synthetic 64*64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    p.add_argument("--overwrite", action="store_true", help="synthetic: write into a non-empty --out")
    args = p.parse_args(argv)
    try:
        if args.synthetic is not None:
            return write_synthetic(args.synthetic, args.out, args.frames or 17, args.size or "64*64", args.seed,
                                   args.overwrite)
        if not (args.ckpt_dir and args.videos):
            p.error("precompute needs --ckpt_dir and --videos (or pass --synthetic N to write synthetic clips)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # torchrun: split the clips
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
            if args.device == "cuda":
                args.device = f"cuda:{os.environ['LOCAL_RANK']}"
                torch.cuda.set_device(args.device)
        return precompute(args.ckpt_dir, args.videos, args.out, args.frames, args.size, args.device)
    except (FileNotFoundError, ValueError) as e:  # every rank finds it; rank 0 says it
        raise SystemExit(f"data.py: error: {e}" if int(os.environ.get("RANK", "0")) == 0 else 1) from None
    finally:
        if dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.destroy_process_group()


def end_rank():
    """End a torchrun rank (WORLD_SIZE > 1) whose work is done and whose process group is destroyed: flush, then
    os._exit(0), skipping the interpreter's teardown. CI saw finished 2-rank runs of data.py and distill.py abort
    there (SIGABRT, "terminate called without an active exception") after their last line of output, which made
    torchrun report a failed run; not reproduced on the 2-core box in 20 runs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
    end_rank()
