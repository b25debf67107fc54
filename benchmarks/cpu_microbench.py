"""The CPU measurements behind the fast path's choices (docs/performance.md), each a few seconds:

    python benchmarks/cpu_microbench.py                 # all of them
    python benchmarks/cpu_microbench.py --only sdpa,widths

  sdpa     attention per EDT-B x2 72x72 block (72 windows x 6 heads, 144 tokens): head dim 15 vs 16, 1 vs 2 threads
  widths   fp32 linear layers at EDT-B's widths (5184 tokens): 540 vs 544/576 and 180 vs 184 outputs, MKL vs oneDNN
  products the explicit attention's pieces for one chunk (5 windows x 6 heads, 144 tokens), 2 threads:
           q kᵀ, softmax and softmax · v at head dims 5, 8 and 16 (why EDT-T pads q and k to 8 and v to 16)
  convgelu the FFN's depthwise 5x5 conv then GELU, against oneDNN's conv with the GELU fused and the 8-lane C kernel
           (EDT-B 72x72, EDT-T 264x264, 2 threads)
  faults   page faults and system time per EDT-B x2 72x72 pass, with and without the allocator tuning (fresh
           processes, one thread)

Times are CPU time (``time.process_time``) for one thread, wall time for two; best of several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def best(fn, *args, clock=time.process_time, runs=7, **kwargs) -> float:
    """Best of ``runs`` calls of fn(*args, **kwargs), in ms."""
    fn(*args, **kwargs)
    out = float("inf")
    for _ in range(runs):
        t0 = clock()
        fn(*args, **kwargs)
        out = min(out, clock() - t0)
    return out * 1e3


def sdpa():
    print("attention, EDT-B block (72 x 6 heads x 144 tokens), ms:")
    bw, heads, n = 72, 6, 144
    mask = torch.zeros(bw, 1, n, n)
    mask[..., :12] = -100.0
    for d in (15, 16):
        q, k, v = torch.randn(bw, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        row = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            clock = time.process_time if threads == 1 else time.perf_counter
            row.append(best(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, scale=15 ** -0.5,
                            clock=clock))
        print(f"  head dim {d}: 1 thread {row[0]:6.1f}   2 threads {row[1]:6.1f}")
    torch.set_num_threads(1)


def widths():
    print("linear layers, 5184 tokens, 1 thread, ms (GFLOP/s):")
    torch.set_num_threads(1)
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    for k, n in ((180, 540), (180, 544), (180, 576), (180, 180), (180, 184), (360, 180), (360, 184)):
        x, w, b = torch.randn(5184, k), torch.randn(n, k), torch.randn(n)
        flop = 2 * 5184 * k * n
        mkl = best(F.linear, x, w, b)
        line = f"  {k:3d} -> {n:3d}: MKL {mkl:6.2f} ({flop / mkl / 1e6:5.1f})"
        if op is not None:
            dnn = best(op, x, w, b, "none", [], "")
            line += f"   oneDNN {dnn:6.2f} ({flop / dnn / 1e6:5.1f})"
        print(line)


def products():
    print("explicit attention, one chunk (30 window-heads x 144 tokens), 2 threads, ms:")
    torch.set_num_threads(2)
    logits = torch.randn(30, 144, 144)
    for d in (5, 8, 16):
        q, k, v = (torch.randn(30, 144, d) for _ in range(3))
        qk = best(torch.bmm, q, k.transpose(1, 2), clock=time.perf_counter, runs=50)
        pv = best(torch.bmm, logits, v, clock=time.perf_counter, runs=50)
        sm = best(torch._softmax, logits, -1, False, out=logits, clock=time.perf_counter, runs=50)
        print(f"  head dim {d:2d}: q kT {qk:6.3f}   softmax (in place) {sm:6.3f}   softmax . v {pv:6.3f}")
    torch.set_num_threads(1)


def convgelu():
    """The FFN's depthwise conv + GELU three ways: PyTorch's conv then GELU, oneDNN's conv with the GELU fused (what
    the fast path runs with AVX-512 kernels off), and the 8-lane C kernel (what it runs without AVX-512)."""
    from edtir.models import cpu_kernel

    print("FFN depthwise 5x5 conv + GELU (channels-last), 2 threads, ms:")
    torch.set_num_threads(2)
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    for label, side, C in (("EDT-B 72x72", 72, 360), ("EDT-T 264x264", 264, 120)):
        h = torch.randn(1, side, side, C)
        x = h.permute(0, 3, 1, 2)
        w, b = torch.randn(C, 1, 5, 5), torch.randn(C)
        two = best(lambda: F.gelu(F.conv2d(x, w, b, padding=2, groups=C)), clock=time.perf_counter, runs=30)  # noqa: B023
        line = f"  {label:<14} {C} channels: conv, then GELU {two:6.2f}"
        if op is not None:
            one = best(op, x, w, b, [2, 2], [1, 1], [1, 1], C, "gelu", [], "none", clock=time.perf_counter, runs=30)
            line += f"   fused {one:6.2f}"
        if cpu_kernel.library8() is not None:
            with torch.no_grad():
                eight = best(cpu_kernel.dwconv_gelu8, h, w, b, clock=time.perf_counter, runs=30)
            line += f"   8-lane C kernel {eight:6.2f}"
        print(line)
    torch.set_num_threads(1)


def faults_child(tune: bool) -> dict:
    torch.set_num_threads(1)
    from edtir.models import edt

    edt.TUNE_CPU_ALLOCATOR = tune
    model = edt.build_model("B", ["sr-x2"]).eval()
    x = torch.rand(1, 3, 72, 72)
    with torch.inference_mode():
        model(x)
        model(x)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), os.times()
        model(x)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), os.times()
    return {"faults": r1.ru_minflt - r0.ru_minflt, "system": t1.system - t0.system, "user": t1.user - t0.user}


def faults():
    print("EDT-B x2 72x72, one pass after two warm-ups, 1 thread:")
    for tune in (False, True):
        out = subprocess.run([sys.executable, __file__, "--faults-child", str(int(tune))], capture_output=True,
                             text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  allocator tuned {str(tune):<5}: {r['faults']:7d} minor page faults, system {r['system']:.2f} s, "
              f"user {r['user']:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="sdpa,widths,products,convgelu,faults",
                    help="comma list of sdpa, widths, products, convgelu, faults")
    ap.add_argument("--faults-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.faults_child is not None:
        print(json.dumps(faults_child(args.faults_child == "1")))
        return 0
    print(f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; load average "
          f"{os.getloadavg()[0]:.1f}")
    for name in args.only.split(","):
        {"sdpa": sdpa, "widths": widths, "products": products, "convgelu": convgelu, "faults": faults}[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
