"""The anti-blocking FFN's depthwise 5x5 conv in the two memory layouts it can take: a channels-last view of the
(B, H, W, C) token map (free) or an NCHW copy (two transposes). On an H200, cuDNN runs the channels-last one with a
generic grouped kernel that took half of EDT-B's forward time; PyTorch's own depthwise kernel takes NCHW.

    python benchmarks/dwconv_layouts.py --device cuda
    python benchmarks/dwconv_layouts.py --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

SHAPES = {  # name -> (B, H, W, hidden)
    "EDT-B infer 240x360": (1, 240, 360, 360),
    "EDT-B train b32 p48": (32, 48, 48, 360),
    "EDT-T train b64 p48": (64, 48, 48, 120),
}


def run(conv, x, layout, backward):
    y = x.permute(0, 3, 1, 2)
    if layout == "nchw":
        y = y.contiguous()
    out = conv(y).permute(0, 2, 3, 1)
    if backward:
        out.float().sum().backward()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"# {where}; torch {torch.__version__}; times in ms, median of {args.repeats}")
    print(f"{'shape':<30}{'dtype':<7}{'pass':<10}{'channels-last':>14}{'NCHW copy':>11}{'ratio':>7}")
    for name, (b, h, w, c) in SHAPES.items():
        if dev.type == "cpu":
            b = max(1, b // 16)
        for dtype in (torch.float32, torch.bfloat16):
            conv = nn.Conv2d(c, c, 5, padding=2, groups=c).to(dev, dtype)
            for backward in (False, True):
                x = torch.randn(b, h, w, c, device=dev, dtype=dtype, requires_grad=backward)
                ms = {}
                for layout in ("cl", "nchw"):
                    with torch.set_grad_enabled(backward):
                        run(conv, x, layout, backward)
                        times = []
                        for _ in range(args.repeats):
                            sync()
                            t0 = time.perf_counter()
                            run(conv, x, layout, backward)
                            sync()
                            times.append(time.perf_counter() - t0)
                    ms[layout] = sorted(times)[len(times) // 2] * 1e3
                label = name if dev.type == "cuda" else f"{name} (batch {b})"
                print(f"{label:<30}{str(dtype)[6:]:<7}{'fwd+bwd' if backward else 'fwd':<10}"
                      f"{ms['cl']:>14.3f}{ms['nchw']:>11.3f}{ms['cl'] / ms['nchw']:>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
