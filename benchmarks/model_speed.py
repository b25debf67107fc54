"""Forward-pass time of EDT models (inference, batch 1), printed as a table.

    python benchmarks/model_speed.py                       # CPU, 2 threads, EDT-B SR x2 on 72x72 (the issue's case)
    python benchmarks/model_speed.py --sizes T,S,B,L --input 72
    python benchmarks/model_speed.py --device cuda --input 240 --precision fp32,bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edtir.models.edt import build_model
from edtir.models.profile import macs_per_pixel


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, x, task, device, precision, repeats, warmup):
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
           else torch.autocast(device.type, enabled=False))
    times = []
    with torch.inference_mode(), ctx:
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            model(x, task=task)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="B", help="comma list of T,S,B,L (default B)")
    ap.add_argument("--task", default="sr-x2")
    ap.add_argument("--input", type=int, default=72, help="input side in pixels (default 72)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--precision", default="fp32", help="comma list of fp32,bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"# EDT forward time, batch {args.batch}, input {args.input}x{args.input}, {args.task}; {where}; "
          f"torch {torch.__version__}")
    print(f"{'model':<8}{'precision':<10}{'params':>12}{'GMACs':>9}{'median ms':>11}{'min ms':>9}{'peak MiB':>10}")
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = build_model(size, [args.task]).to(device).eval()
        gmacs = macs_per_pixel(model, args.task, args.input) * args.input ** 2 / 1e9
        x = torch.rand(args.batch, 3, args.input, args.input, device=device)
        for prec in args.precision.split(","):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time_forward(model, x, args.task, device, prec, args.repeats, args.warmup)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            print(f"EDT-{size:<4}{prec:<10}{model.info.params:>12,}{gmacs * args.batch:>9.2f}"
                  f"{statistics.median(t) * 1e3:>11.1f}{min(t) * 1e3:>9.1f}{peak:>10.0f}")


if __name__ == "__main__":
    main()
