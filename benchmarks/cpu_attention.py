"""CPU fp32 inference, four ways to compute the attention, interleaved in one process with the same weights and
input: the flash kernel (heads padded to 16), the explicit, chunked attention (``edtir.models.edt.
windowed_attention``; it pads EDT-T's q and k to 8 only), the C kernels of a block (``edtir.models.cpu_kernel``:
the norm, qkv, both branches, the shift mask and LePE in one call, no gathers; then proj and the FFN in another;
the default with AVX-512) and the 8-lane attention kernel (``cpu_kernel.window_attention8``: the gathers, the
attention, the shift mask and LePE in one call inside PyTorch's fast path; the default without AVX-512). Both C
ways run on any CPU here, whatever the default.

    python benchmarks/cpu_attention.py                       # T 264, S 144, B 72, B 144, L 48; 2 threads, 3 rounds
    python benchmarks/cpu_attention.py --cases T:264,B:144 --threads 1 --rounds 5
    python benchmarks/cpu_attention.py --blocks    # one block's attention alone: head dims, threads, every way
                                                   # (a shifted block: the 8-lane kernel adds the mask)
    python benchmarks/cpu_attention.py --pads      # EDT-T 264x264, explicit: q/k padded to 8 (the default), 16, 5
    python benchmarks/cpu_attention.py --train     # one block's attention in training: forward, and with backward
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import edtir.models.edt as E
from edtir.models import cpu_kernel


def median_ms(f, repeats: int = 10, warmup: int = 1) -> float:
    for _ in range(warmup):
        f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved(model, x, ways: dict, rounds: int) -> tuple[dict, dict]:
    """``model(x)`` under each way in turn (``ways``: name -> a function that switches to it), for a warm-up round
    and ``rounds`` more; returns the times of the timed rounds and the last output, per way. The caller puts the
    switches back."""
    times, outs = {w: [] for w in ways}, {}
    with torch.inference_mode():
        for _ in range(rounds + 1):
            for way, switch in ways.items():
                switch()
                t0 = time.perf_counter()
                outs[way] = model(x)
                times[way].append(time.perf_counter() - t0)
    return {w: t[1:] for w, t in times.items()}, outs


def blocks() -> None:
    """The attention of one block alone, random inputs: an EDT-T block at 264x264 (968 windows x 6 heads of 144
    tokens) at head dims 5, 8, 16, and an EDT-B block at 72x72 (72 windows x 6 heads, head dim 15, 16), on 1 and 2
    threads: the flash kernel and :func:`windowed_attention` on q, k, v, and the C kernel, which also does the
    norm and the qkv product (timed on their own as the eager fast path does them, oneDNN's product, in the column
    before it)."""
    import torch.nn.functional as F

    E.tune_cpu_allocator()  # as the model's first CPU pass does: freed maps are reused, not faulted in afresh
    print("# one block's attention, median ms of 10; the C kernel's time includes the norm, the qkv product, LePE "
          "and the gathers; the 8-lane kernel's the gathers and LePE (not the norm and qkv, which PyTorch does "
          "before it), at the head dims it runs unpadded")
    print(f"{'block':<18}{'threads':>8}{'head dim':>10}{'flash':>10}{'explicit':>10}{'norm+qkv':>10}{'C kernel':>10}"
          f"{'8-lane':>10}")
    for label, windows, side, dims in (("EDT-T 264x264", 968, 264, (5, 8, 16)), ("EDT-B 72x72", 72, 72, (15, 16))):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for d in dims:
                q, k, v = (torch.randn(windows, 6, 144, d) for _ in range(3))
                flash = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))  # noqa: B023
                explicit = median_ms(lambda: E.windowed_attention(q, k, v, None, d ** -0.5))  # noqa: B023
                C = 12 * d
                x, norm, lin = torch.randn(1, side, side, C), torch.nn.LayerNorm(C), torch.nn.Linear(C, 6 * 6 * d)
                wq, bq = lin.weight.detach(), lin.bias.detach()
                with torch.no_grad():  # the eager fast path's norm and product (oneDNN's)
                    qkv = median_ms(lambda: E.linear(lin, norm(x)))  # noqa: B023
                kernel = float("nan")
                if cpu_kernel.library():
                    w = cpu_kernel.attention_weights(norm, wq, bq, torch.randn(12 * d, 9), torch.zeros(12 * d))
                    kernel = median_ms(lambda: cpu_kernel.block_attention(  # noqa: B023
                        x, w, (6, 24), (3, 12), 6, d))  # noqa: B023
                eight = float("nan")
                if cpu_kernel.library8() and d in (5, 15):  # EDT's own head dims: the kernel takes them unpadded
                    lay = E.WindowLayout(side, side, (6, 24), (3, 12), "cpu")
                    gather, _ = lay.indices(1, True)
                    rows = torch.randn(side * side * 2, 3 * 6 * d)
                    lepe = (torch.randn(2, 9, 6 * d), torch.randn(2, 6 * d), (6, 24))
                    with torch.no_grad():
                        eight = median_ms(lambda: cpu_kernel.window_attention8(  # noqa: B023
                            rows, 6, d, lay.key_major_bias(), lay.bias_from, lay.windows,  # noqa: B023
                            index=gather, n=144, lepe=lepe))  # noqa: B023
                print(f"{label:<18}{threads:>8}{d:>10}{flash:>10.1f}{explicit:>10.1f}{qkv:>10.1f}{kernel:>10.1f}"
                      f"{eight:>10.1f}", flush=True)


def train_blocks() -> None:
    """The attention of one block in training alone, forward and forward + backward, random inputs: EDT-T's and
    EDT-B's heads (6 of 5, 6 of 15) on 8 LR patches of 48x48 (256 windows of 144 tokens, both branches), 1 and 2
    threads. torch's fused attention on q, k, v (no mask, no LePE, no gathers; what training takes without the
    kernels on a CPU without AVX-512), and the training kernel in both builds (16 lanes, the AVX-512 library's,
    forced where it is not wanted; 8 lanes, the 8-lane library's) with the gathers, a shifted block's mask and LePE,
    and their gradients."""
    import torch.nn.functional as F

    E.tune_cpu_allocator()
    print("# one block's attention in training, batch 8 of 48x48, median ms of 10 (forward / forward + backward); "
          "the kernels' times include the gathers, the shift mask and LePE")
    print(f"{'block':<8}{'threads':>8}{'head dim':>10}{'fused':>18}{'C kernel':>18}{'C 8-lane':>18}")
    builds = {"C kernel": cpu_kernel.library(), "C 8-lane": cpu_kernel.library8()}
    lay = E.WindowLayout(48, 48, (6, 24), (3, 12), "cpu")
    gather, _ = lay.indices(8, True)
    nw = gather.numel() // 144
    for label, d in (("EDT-T", 5), ("EDT-B", 15)):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            q, k, v = (torch.randn(nw, 6, 144, d, requires_grad=True) for _ in range(3))
            rows = torch.randn(gather.numel(), 18 * d, requires_grad=True)
            lw, lb = torch.randn(2, 9, 6 * d, requires_grad=True), torch.randn(2, 6 * d, requires_grad=True)
            ways = {"fused": (lambda: F.scaled_dot_product_attention(q, k, v), q.shape)}  # noqa: B023
            for name, lib in builds.items():
                if lib is not None:
                    ways[name] = (lambda lib=lib: cpu_kernel.window_attention(  # noqa: B023
                        rows, 6, d, lay.tail_bias(torch.float32), lay.bias_from, lay.windows,  # noqa: B023
                        index=gather, n=144, lepe=(lw, lb, (6, 24)), lib=lib), (gather.numel(), 6 * d))  # noqa: B023
            cells = []
            for name in ("fused", *builds):
                if name not in ways:
                    cells.append("-")
                    continue
                f, shape = ways[name]
                g = torch.randn(shape)
                fwd = median_ms(f)
                both = median_ms(lambda f=f, g=g: f().backward(g))
                cells.append(f"{fwd:.1f} / {both:.1f}")
            print(f"{label:<8}{threads:>8}{d:>10}" + "".join(f"{c:>18}" for c in cells), flush=True)


def pads(args) -> None:
    """The explicit attention with EDT-T's q and k padded to 8 (what ``head_pad`` picks), to 16 or not at all (v
    at 16 in all three), in the whole model, interleaved."""
    torch.set_num_threads(args.threads)
    chosen = E.head_pad
    ways = {"q,k 8 (default)": chosen,
            "q,k 16": lambda device, d, explicit=False: (16, 16) if d <= 16 else chosen(device, d, explicit),
            "q,k 5": lambda device, d, explicit=False: (d, 16) if explicit and d <= 8 else chosen(device, d, explicit)}
    print(f"# CPU, {args.threads} threads; load average {os.getloadavg()[0]:.1f}; median (min) s of {args.rounds} "
          "interleaved rounds after a warm-up; v padded to 16 in every row")
    for case in args.cases.split(","):
        size, side = case.split(":")
        torch.manual_seed(0)
        model = E.build_model(size, ["sr-x2"]).eval()
        x = torch.rand(1, 3, int(side), int(side))
        try:
            times, outs = interleaved(model, x, {w: lambda f=f: setattr(E, "head_pad", f) for w, f in ways.items()},
                                      args.rounds)
        finally:
            E.head_pad = chosen
        for way, t in times.items():
            diff = (outs[way] - outs["q,k 8 (default)"]).abs().max().item()
            print(f"EDT-{size} {side}x{side}  {way:<18}{statistics.median(t):8.3f} ({min(t):.3f})"
                  f"   max |diff| {diff:.1e}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="T:264,S:144,B:72,B:144,L:48", help="SIZE:SIDE,... (SR x2, square LR input)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", action="store_true", help="time one block's attention alone instead")
    ap.add_argument("--pads", action="store_true", help="compare q/k paddings for EDT-T (default cases T:264)")
    ap.add_argument("--train", action="store_true", help="time one block's attention in training alone instead")
    args = ap.parse_args()
    if args.blocks:
        blocks()
        return 0
    if args.train:
        train_blocks()
        return 0
    if args.pads:
        if args.cases == ap.get_default("cases"):
            args.cases = "T:264"
        pads(args)
        return 0
    torch.set_num_threads(args.threads)
    print(f"# CPU, {args.threads} threads; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}; "
          f"median (min) s of {args.rounds} interleaved rounds after a warm-up; C kernel: {cpu_kernel.status()}")
    names = ("flash", "explicit") + ("C kernel",) * bool(cpu_kernel.library()) + ("C 8-lane",) * bool(
        cpu_kernel.library8())
    fastest = [n for n in names if n.startswith("C")]
    print(f"{'model':<8}{'input':>8}{'head dim':>10}" + "".join(f"{n:>18}" for n in names)
          + "".join(f"{'x ' + n[2:]:>12}" for n in fastest) + f"{'max |diff|':>12}")
    for case in args.cases.split(","):
        size, side = case.split(":")
        torch.manual_seed(0)
        model = E.build_model(size, ["sr-x2"]).eval()
        x = torch.rand(1, 3, int(side), int(side))
        head_dim = model.cfg.embed_dim // 2 // model.cfg.heads
        old = (E.EXPLICIT_MAX_HEAD_DIM, E.explicit_attention.on, cpu_kernel.enabled.on, cpu_kernel.force.on,
               cpu_kernel.native_avx512)
        E.EXPLICIT_MAX_HEAD_DIM = 1 << 30  # every way for every size here

        def switch(name, probe=old[-1]):
            E.explicit_attention.on = name in ("explicit", "C 8-lane")
            cpu_kernel.enabled.on = name.startswith("C")
            cpu_kernel.force.on = name == "C kernel"  # here even without AVX-512
            cpu_kernel.native_avx512 = (lambda: False) if name == "C 8-lane" else probe  # here even with it

        try:
            times, outs = interleaved(model, x, {n: lambda n=n: switch(n) for n in names}, args.rounds)
        finally:
            (E.EXPLICIT_MAX_HEAD_DIM, E.explicit_attention.on, cpu_kernel.enabled.on, cpu_kernel.force.on,
             cpu_kernel.native_avx512) = old
        cell = lambda t: f"{statistics.median(t):.3f} ({min(t):.3f})"  # noqa: E731
        explicit = statistics.median(times["explicit"])  # the speed-ups and the difference: against explicit
        diff = max((outs[n] - outs["explicit"]).abs().max().item() for n in names)
        print(f"EDT-{size:<4}{side + 'x' + side:>8}{head_dim:>10}" + "".join(f"{cell(times[n]):>18}" for n in names)
              + "".join(f"{explicit / statistics.median(times[n]):>12.2f}" for n in fastest) + f"{diff:>12.1e}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
