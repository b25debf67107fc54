"""Training throughput (patches per second) of EDT-T and EDT-B: the real training step of ``edtir.train.loop``
(forward_multi, L1, backward, Adam) on random patches, so data loading is left out.

    python benchmarks/train_speed.py                          # CPU, batch 4, LR patch 48, fp32
    python benchmarks/train_speed.py --device cuda            # GPU, batch 32, bf16 autocast
    python benchmarks/train_speed.py --device cuda --batch 32 --patch 48 --sizes B --steps 20
    python benchmarks/train_speed.py --compare-attention --steps 4   # CPU: the C kernels, explicit, torch's kernel
    python benchmarks/train_speed.py --device cuda --sizes B --compile default   # each block torch.compile'd

For reference, the official code trains EDT-B x2 at batch 32, patch 48 at about 56 patches/s on an H200.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

#: --compare-attention's modes: (C kernels on, the AVX-512 ones forced, PyTorch's explicit attention on); the
#: kernels need the latter. "C 8-lane" (the training kernels built at 8 floats a vector) is what serves by default
#: on a CPU without AVX-512, "explicit" what serves with EDTIR_CPU_KERNEL=0 on one with it (without AVX-512 that
#: mode trains with torch's fused attention, so it is left out there)
MODES = {"C kernel": (True, True, True), "C 8-lane": (True, False, True), "explicit": (False, False, True),
         "fused": (False, False, False)}


def modes() -> dict:
    """:data:`MODES` that make sense on this CPU."""
    from edtir.models import cpu_kernel

    drop = "explicit" if cpu_kernel.native_avx512() is False else "C 8-lane"
    return {m: v for m, v in MODES.items() if m != drop}


def training_step(size: str, task: str, batch: int, hw: tuple[int, int], device: torch.device, bf16: bool,
                  drop_path: float, compile_mode: str | None = None):
    """(the trainer's own step on one random batch, as a call; the parameter count): ``hw`` is the input's size
    (LR for SR, the noisy/rainy image for denoise/derain). Also what ``profile_model.py --train`` profiles."""
    from edtir.models.edt import build_model, compile_blocks
    from edtir.train.loop import MultiTaskStep, train_step

    torch.manual_seed(0)
    model = build_model(size, [task], drop_path=drop_path).to(device).train()
    if compile_mode:
        compile_blocks(model, None if compile_mode == "default" else compile_mode)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.99))
    s = model.scale(task)
    h, w = hw
    data = {task: (torch.rand(batch, 3, h, w, device=device), torch.rand(batch, 3, h * s, w * s, device=device))}
    step_module = MultiTaskStep(model)

    def step():
        train_step(step_module, data, opt, {task: 1.0}, device, bf16, None, params)

    return step, sum(p.numel() for p in params)


def bench(size: str, task: str, batch: int, patch: int, device: torch.device, bf16: bool, warmup: int,
          steps: int, drop_path: float, compare: bool = False, compile_mode: str | None = None) -> dict:
    """``compare``: alternate steps between the attentions of :data:`MODES` (same model, same batch) and report
    each one's median ``s_per_step``."""
    import statistics

    from edtir.models import cpu_kernel
    from edtir.models.edt import explicit_attention

    step, n_params = training_step(size, task, batch, (patch, patch), device, bf16, drop_path, compile_mode)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync()
    if compare:
        times = {mode: [] for mode in modes()}
        for _ in range(steps):
            for mode, (kernel, forced, explicit) in modes().items():
                with cpu_kernel.enabled(kernel), cpu_kernel.force(forced), explicit_attention(explicit):
                    t0 = time.perf_counter()
                    step()
                    times[mode].append(time.perf_counter() - t0)
        return {"s_per_step": {m: statistics.median(t) for m, t in times.items()}, "params": n_params}
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"s_per_step": dt, "patches_per_s": batch / dt, "mem_gib": mem, "params": n_params}


def main() -> int:
    ap = argparse.ArgumentParser(description="EDT training throughput (patches/s).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--sizes", default="T,B", help="comma-separated EDT sizes (default T,B)")
    ap.add_argument("--task", default="sr-x2", help="task (default sr-x2)")
    ap.add_argument("--batch", type=int, default=None, help="patches per step (default 32 on GPU, 4 on CPU)")
    ap.add_argument("--patch", type=int, default=None,
                    help="input patch side (default 48 for SR, 192 for denoise/derain)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="default bf16 autocast on GPU, fp32 on CPU")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU, 1 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 2 CPU)")
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--compare-attention", action="store_true",
                    help="CPU fp32: alternate steps between the C kernel's attention, the explicit one and "
                         "torch's fused kernel")
    ap.add_argument("--compile", choices=("default", "max-autotune-no-cudagraphs"), default=None,
                    help="torch.compile each transformer block (edt.compile_blocks); the warm-up steps compile")
    args = ap.parse_args()

    from edtir.models.edt import task_kind

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    if args.compare_attention and (gpu or args.precision == "bf16"):
        print("--compare-attention is for CPU fp32 training (the explicit attention serves nothing else)",
              file=sys.stderr)
        return 2
    if args.compile and args.compare_attention:
        print("--compile and --compare-attention do not go together", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    batch = args.batch or (32 if gpu else 4)
    patch = args.patch or (48 if task_kind(args.task) == "sr" else 192)
    precision = args.precision or ("bf16" if gpu else "fp32")
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    steps = args.steps if args.steps is not None else (20 if gpu else 2)
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}, " \
                                                           f"{torch.get_num_threads()} threads"
    print(f"device: {device.type} ({name}); torch {torch.__version__}; task {args.task}, batch {batch}, "
          f"patch {patch}, {precision}, {warmup} warm-up + {steps} timed steps"
          + (f"; blocks compiled ({args.compile})" if args.compile else ""))
    if args.compare_attention:
        print(f"{'model':<7} {'params':>11} " + " ".join(f"{'s/step ' + m:>18}" for m in modes())
              + "   (medians of alternating steps)")
    else:
        print(f"{'model':<7} {'params':>11} {'s/step':>9} {'patches/s':>10} {'peak GiB':>9}")
    for size in [s.strip().upper() for s in args.sizes.split(",") if s.strip()]:
        try:
            r = bench(size, args.task, batch, patch, device, precision == "bf16", warmup, steps, args.drop_path,
                      args.compare_attention, args.compile)
            if args.compare_attention:
                print(f"EDT-{size:<3} {r['params']:>11,} "
                      + " ".join(f"{r['s_per_step'][m]:>18.3f}" for m in modes()), flush=True)
                continue
        except torch.OutOfMemoryError:
            print(f"EDT-{size:<3} {'out of memory at this batch':>40}")
            torch.cuda.empty_cache()
            continue
        mem = f"{r['mem_gib']:.2f}" if gpu else "-"
        print(f"EDT-{size:<3} {r['params']:>11,} {r['s_per_step']:>9.3f} {r['patches_per_s']:>10.1f} {mem:>9}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
