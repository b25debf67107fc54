"""Where the time of one EDT forward pass goes: torch.profiler's operator table, grouped into kinds of work.

    python benchmarks/profile_model.py                              # EDT-B SR x2, 72x72, CPU, 2 threads
    python benchmarks/profile_model.py --size T --input 128         # EDT-T SR x2 on 128x128 (a 256x256 output)
    python benchmarks/profile_model.py --mode reference             # the plain reference formulation
    python benchmarks/profile_model.py --device cuda --input 240x360 --precision bf16
    git worktree add /tmp/edtir-old 52c93f3 && PYTHONPATH=/tmp/edtir-old/src python benchmarks/profile_model.py
                                                                    # the code before the fast path

Self time per operator (CPU time on the CPU, CUDA kernel time on a GPU), averaged over ``--repeats`` passes
after one warm-up (inputs are mirror-padded to the size multiple as in ``edtir.restore``), printed as the top
operators and as a share per kind (matrix products, attention, softmax, copies, convolutions, ...).

    python benchmarks/profile_model.py --timers                     # wall clock per part, no profiler (CPU)
    python benchmarks/profile_model.py --train --device cuda --batch 32 --input 48 --precision bf16
                                                                    # one training step (forward, L1, backward, Adam)

``--train`` profiles ``edtir.train.loop.train_step`` (the trainer's own step, drop path 0.1, random patches, so
data loading is left out) instead of an inference pass; on a GPU the kernels are grouped by the same kinds, with
the optimizer's and the gradients' own kinds added.

The profiler adds a fixed cost to each of the thousands of operators of a pass, and it shows: for EDT-T at 264x264
it put 751 ms on the window gathers that take 276 ms without it. ``--timers`` wraps the fast path's parts (each
linear layer by shape, the windowed attention, the gathers, convolutions, the fused depthwise conv + GELU, layer
norm) in wall-clock timers instead, median of ``--repeats`` passes; "rest" is what the pass took outside them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from edtir.inference import forward_padded
from edtir.models import cpu_kernel, edt

#: operator name fragment -> kind of work; first match wins (order matters: "addmm" before "mm")
KINDS = [
    ("adam", "optimizer (Adam)"),
    ("foreach", "optimizer (Adam)"),
    ("triton_", "Triton kernels of torch.compile"),  # inductor's names; edtir's own fall in the kinds below
    ("scaled_dot_product", "attention (fused SDPA)"),
    ("fmha", "attention (fused SDPA)"),
    ("flash_attention", "attention (fused SDPA)"),
    ("efficient_attention", "attention (fused SDPA)"),
    ("softmax", "softmax"),
    ("attention", "attention (edtir's own kernels)"),
    ("addmm", "matrix products"),
    ("bmm", "matrix products"),
    ("baddbmm", "matrix products"),
    ("matmul", "matrix products"),
    ("aten::mm", "matrix products"),
    ("linear", "matrix products"),
    ("gemm", "matrix products"),
    ("xmma", "matrix products"),
    ("cutlass", "matrix products"),
    ("nvjet", "matrix products"),
    ("conv", "convolutions"),
    ("layer_norm", "layer norm"),
    ("gelu", "activations"),
    ("leaky_relu", "activations"),
    ("roll", "copies and layout"),
    ("copy_", "copies and layout"),
    ("clone", "copies and layout"),
    ("contiguous", "copies and layout"),
    ("cat", "copies and layout"),
    ("index", "copies and layout"),
    ("pad", "copies and layout"),
    ("pixel_shuffle", "copies and layout"),
    ("add", "elementwise (add, mul, ...)"),
    ("mul", "elementwise (add, mul, ...)"),
    ("sub", "elementwise (add, mul, ...)"),
    ("div", "elementwise (add, mul, ...)"),
    ("where", "elementwise (add, mul, ...)"),
    ("masked_fill", "elementwise (add, mul, ...)"),
    ("upsample", "elementwise (add, mul, ...)"),
    ("elementwise", "elementwise (add, mul, ...)"),
    ("reduce", "reductions (loss, norms' grads)"),
    ("sum", "reductions (loss, norms' grads)"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for frag, kind in KINDS:
        if frag in low:
            return kind
    return "other"


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


@contextlib.contextmanager
def part_timers(acc: dict[str, float]):
    """Wall-clock time per part of the fast path (CPU: every call returns when its work is done), added to ``acc``."""
    F = torch.nn.functional
    targets = [(edt, "linear", None), (cpu_kernel, "block_attention", "norm + qkv + attention + LePE (C kernel, CPU)"),
               (cpu_kernel, "proj_ffn", "proj + FFN + residual adds (C kernel, CPU)"),
               (cpu_kernel, "window_attention8", "gathers + attention + LePE (8-lane C kernel, CPU)"),
               (cpu_kernel, "dwconv_gelu8", "FFN depthwise conv + GELU (8-lane C kernel, CPU)"),
               (edt, "windowed_attention", "windowed attention (explicit, CPU)"),
               (edt, "permute_rows", "window gathers (index_select)"), (F, "conv2d", "convolutions (LePE, head, tail)"),
               (F, "scaled_dot_product_attention", "attention (fused SDPA)"), (F, "layer_norm", "layer norm"),
               (torch.ops.mkldnn, "_convolution_pointwise", "FFN depthwise conv + GELU (fused)")]
    saved = []

    def timed(fn, label):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            key = label or "linear {}x{}".format(*k.get("weight", a[0].weight).shape)  # out x in features
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
            return out
        return call

    for owner, name, label in targets:
        if hasattr(owner, name):
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, timed(getattr(owner, name), label))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def run_timers(model, x, task: str, repeats: int, header: str, amp) -> int:
    passes = []
    with torch.inference_mode(), amp:
        forward_padded(model, x, task)
        for _ in range(repeats):
            acc: dict[str, float] = {}
            with part_timers(acc):
                t0 = time.perf_counter()
                forward_padded(model, x, task)
                total = time.perf_counter() - t0
            acc["rest"] = total - sum(acc.values())
            passes.append((total, acc))
    total = statistics.median(t for t, _ in passes)
    parts = {k: statistics.median(a.get(k, 0.0) for _, a in passes) for k in passes[0][1]}
    print(f"{header}; wall clock per pass {total * 1e3:.0f} ms (median of {repeats}, timers, no profiler)")
    print(f"{'part':<48}{'ms/pass':>9}{'share':>8}")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{k:<48}{v * 1e3:>9.1f}{v / total:>8.1%}")
    return 0


def report(prof, cuda: bool, repeats: int, top: int, header: str, unit: str = "pass") -> None:
    """The top operators (CUDA kernels on a GPU) by self time, then the share of each kind of work."""
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [(e.key, getattr(e, attr) / 1e3 / repeats, e.count // repeats) for e in events]
    rows = [r for r in rows if r[1] > 0]
    total = sum(r[1] for r in rows)
    print(f"{header}; self time per {unit} {total:.0f} ms (profiler on)")
    print(f"{'operator':<48}{'ms/' + unit:>9}{'share':>8}{'calls':>7}")
    for name, ms, n in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"{name[:47]:<48}{ms:>9.1f}{ms / total:>8.1%}{n:>7}")
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    print(f"\n{'kind of work':<48}{'ms/' + unit:>9}{'share':>8}")
    for kind, ms in sorted(kinds.items(), key=lambda r: -r[1]):
        print(f"{kind:<48}{ms:>9.1f}{ms / total:>8.1%}")


def profile_training(args, device: torch.device, H: int, W: int, where: str) -> int:
    """The trainer's step on random patches (input H x W, target scaled by the task), as train_speed.py times it."""
    from train_speed import training_step  # this folder's script: the same step, built the same way

    cuda = device.type == "cuda"
    step, _ = training_step(args.size, args.task, args.batch, (H, W), device, args.precision == "bf16", 0.1)
    for _ in range(2):  # warm-up: the allocator, cuDNN's choices, the kernels' first compilation
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.repeats):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.repeats
    report(prof, cuda, args.repeats, args.top,
           f"# training step, EDT-{args.size} {args.task}, batch {args.batch}, input {H}x{W}, {args.precision}; "
           f"{where}; torch {torch.__version__}; wall clock per step {wall * 1e3:.0f} ms "
           f"({args.batch / wall:.1f} patches/s with the profiler on)", unit="step")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="B", help="EDT size T, S, B or L (default B)")
    ap.add_argument("--task", default="sr-x2")
    ap.add_argument("--input", default="72", help="input side, or HxW (default 72)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--mode", choices=("fast", "reference"), default="fast", help="attention formulation")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    ap.add_argument("--timers", action="store_true", help="wall clock per part of the fast path instead (CPU)")
    ap.add_argument("--train", action="store_true",
                    help="profile the trainer's step (forward, L1, backward, Adam; drop path 0.1) instead")
    args = ap.parse_args()
    if args.train and (args.timers or args.mode != "fast"):
        print("--train profiles the fast path with the profiler (not with --timers or --mode reference)",
              file=sys.stderr)
        return 2
    if args.timers and (args.device != "cpu" or args.mode != "fast"):
        print("--timers times the fast path on the CPU (a GPU runs asynchronously: use the profiler there)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    H, W = parse_size(args.input)
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    if args.train:
        return profile_training(args, device, H, W, where)
    model = edt.build_model(args.size, [args.task]).to(device).eval()
    x = torch.rand(args.batch, 3, H, W, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if args.timers:
        return run_timers(model, x, args.task, args.repeats,
                          f"# EDT-{args.size} {args.task} {H}x{W} batch {args.batch}, {args.precision}, fast path; "
                          f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}", amp)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    mode = edt.attention_mode(args.mode) if hasattr(edt, "attention_mode") else contextlib.nullcontext()
    with torch.inference_mode(), amp, mode:
        forward_padded(model, x, args.task)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.repeats):
                forward_padded(model, x, args.task)
            if cuda:
                torch.cuda.synchronize()
    report(prof, cuda, args.repeats, args.top,
           f"# EDT-{args.size} {args.task} {H}x{W} batch {args.batch}, {args.precision}, "
           f"{args.mode + ' path' if hasattr(edt, 'attention_mode') else 'code without attention paths'}; {where}; "
           f"torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
