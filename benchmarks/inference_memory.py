"""Peak memory of one forward pass against the engine's estimate (``edtir.inference.bytes_per_pixel``), on the
CPU: each case runs in a fresh process, and the rise of its peak resident memory over a warm-up pass is the
measurement (fp32, batch 1, random weights, 1 thread).

    python benchmarks/inference_memory.py
    python benchmarks/inference_memory.py --cases T:sr-x2:192,B:denoise-25:192
    python benchmarks/inference_memory.py --device cuda      # torch.cuda.max_memory_allocated instead

The estimate must stay above the measurement (automatic tiling relies on it), and not far above (it would tile
images that fit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

DEFAULT = "T:sr-x2:96,T:sr-x2:192,T:sr-x4:96,S:sr-x3:96,B:sr-x2:96,T:denoise-25:384,B:denoise-25:192"


def one(size: str, task: str, side: int, device: str) -> dict:
    import resource

    import torch

    from edtir.inference import bytes_per_pixel, forward_padded
    from edtir.models.edt import build_model

    torch.set_num_threads(1)
    model = build_model(size, [task]).eval().to(device)
    m = model.size_multiple(task)
    with torch.inference_mode():
        forward_padded(model, torch.rand(1, 3, m, m, device=device), task)  # warm-up: kernels, allocator
        x = torch.rand(1, 3, side, side, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        forward_padded(model, x, task)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"measured": peak / side / side, "estimate": bytes_per_pixel(model, task)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=DEFAULT, help="SIZE:TASK:SIDE,... (input side in pixels)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        size, task, side = args.one.split(":")
        print(json.dumps(one(size, task, int(side), args.device)))
        return 0
    print(f"{'model':<8}{'task':<12}{'input':>9}{'measured B/px':>15}{'estimate B/px':>15}{'estimate/measured':>19}")
    worst = None
    for case in args.cases.split(","):
        size, task, side = case.split(":")
        r = subprocess.run([sys.executable, __file__, "--one", case, "--device", args.device], capture_output=True,
                           text=True, check=True)
        v = json.loads(r.stdout.strip().splitlines()[-1])
        ratio = v["estimate"] / v["measured"] if v["measured"] > 0 else float("inf")
        worst = ratio if worst is None else min(worst, ratio)
        print(f"EDT-{size:<4}{task:<12}{side + 'x' + side:>9}{v['measured']:>15,.0f}{v['estimate']:>15,.0f}"
              f"{ratio:>19.2f}", flush=True)
    print(f"lowest estimate/measured: {worst:.2f} (must stay above 1)")
    return 0 if worst is not None and worst > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
