"""Evaluation time per image and peak memory, untiled and tiled, printed as a table.

    python benchmarks/eval_speed.py                                  # CPU: EDT-T and EDT-B, SR x2, 2 images
    python benchmarks/eval_speed.py --sizes T --tiles 0,96,48 --tile-overlap 32
    python benchmarks/eval_speed.py --device cuda --precision bf16

Models are fresh (random weights): the point is time and memory, and that tiling leaves the output unchanged
(the PSNR column, and the max difference to the untiled output in grey levels). Each (model, tile) row runs in its
own subprocess so peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the rise of the peak
resident set size (VmHWM) over the resident size after set-up (model built, images loaded, one warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory_stats import current_rss_mib, peak_rss_mib

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: Two images keep the CPU run to a few minutes (EDT-B needs about 0.3 ms per LR pixel on 2 cores); CUDA takes four.
CPU_IMAGES = "Set14/comic.png,B100/101087.png"
CUDA_IMAGES = "Set14/comic.png,Set14/foreman.png,B100/101085.png,B100/101087.png"


def worker(args) -> dict:
    """One (model, tile) configuration; returns its measurements as a dict."""
    import numpy as np
    import torch

    from edtir.data.imresize import imresize
    from edtir.data.io import read_image
    from edtir.evaluate import modcrop
    from edtir.inference import restore
    from edtir.metrics import psnr
    from edtir.models.edt import build_model, task_scale

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    s = task_scale(args.task)
    torch.manual_seed(0)
    model = build_model(args.size, [args.task]).to(device).eval()
    pairs = []
    for rel in args.images.split(","):
        hr = modcrop(read_image(args.data / rel), s)
        pairs.append((rel, hr, imresize(hr, 1 / s)))
    tile = args.tile or None
    opts = dict(task=args.task, tile=tile, tile_overlap=args.tile_overlap, tile_batch=args.tile_batch,
                device=device, precision=args.precision)
    restore(model, np.zeros((24, 24, 3), np.uint8), **opts)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = current_rss_mib()
    times, scores, outputs = [], [], {}
    for rel, hr, lr in pairs:
        t0 = time.perf_counter()
        sr = restore(model, lr, **opts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        scores.append(psnr(sr, hr, crop_border=s, y_channel=True))
        outputs[rel] = sr
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mib() - base
    if args.save_outputs:
        np.savez_compressed(args.save_outputs, **{k.replace("/", "_"): v for k, v in outputs.items()})
    return {"size": args.size, "tile": args.tile, "seconds": times, "psnr": float(np.mean(scores)),
            "peak_mib": peak, "images": len(pairs)}


def run_config(args, size: str, tile: int, out_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--size", size, "--tile", str(tile), "--task", args.task,
           "--tile-overlap", str(args.tile_overlap), "--tile-batch", str(args.tile_batch), "--device", args.device,
           "--precision", args.precision, "--threads", str(args.threads), "--images", args.images,
           "--data", str(args.data), "--save-outputs", str(out_dir / f"{size}-{tile}.npz")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker failed ({size}, tile {tile}):\n{res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def max_diff(out_dir: Path, size: str, tile: int) -> int | None:
    import numpy as np

    base, other = out_dir / f"{size}-0.npz", out_dir / f"{size}-{tile}.npz"
    if tile == 0 or not base.exists():
        return None
    a, b = np.load(base), np.load(other)
    return int(max(np.abs(a[k].astype(int) - b[k].astype(int)).max() for k in a.files))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="T,B", help="comma list of EDT sizes T,S,B,L (default T,B)")
    ap.add_argument("--task", default="sr-x2")
    ap.add_argument("--tiles", default="0,96", help="comma list of tile sizes in input pixels; 0 = untiled")
    ap.add_argument("--tile-overlap", type=int, default=32)
    ap.add_argument("--tile-batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--images", help="comma list of paths under --data (default: 2 images on CPU, 4 on CUDA)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--save-outputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.images = args.images or (CUDA_IMAGES if args.device.startswith("cuda") else CPU_IMAGES)
    if not args.data.is_dir():
        raise SystemExit(f"data folder {args.data} not found (give --data)")

    import tempfile

    import torch

    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(args.device)) if torch.cuda.is_available() else "?"
        mem = "peak MiB (CUDA allocated)"
    else:
        where = f"CPU ({os.cpu_count()} cores), {args.threads} threads"
        mem = "peak MiB (RSS rise)"
    print(f"# eval time per image, {args.task}, {args.precision}, images: {args.images}; {where}; "
          f"torch {torch.__version__}; tile overlap {args.tile_overlap}, tile batch {args.tile_batch}")
    print(f"{'model':<8}{'tile':>6}{'images':>8}{'s/image':>10}{mem:>28}{'PSNR (Y)':>10}{'max diff':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            for tile in (int(t) for t in args.tiles.split(",")):
                r = run_config(args, size, tile, Path(tmp))
                diff = max_diff(Path(tmp), size, tile)
                per = sum(r["seconds"]) / len(r["seconds"])
                print(f"EDT-{size:<4}{tile or 'none':>6}{r['images']:>8}{per:>10.2f}{r['peak_mib']:>28.0f}"
                      f"{r['psnr']:>10.2f}{'-' if diff is None else diff:>10}", flush=True)


if __name__ == "__main__":
    main()
