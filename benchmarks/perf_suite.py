"""The performance issue's workloads x {reference, fast} attention x {fp32, bf16}, in one table: time, peak memory,
achieved TFLOP/s, the ratio to the hardware floor, and a check that the fast path gives the reference's output.
On CUDA the fast path runs inference through the fused Triton kernels (``edtir.models.kernels``), on the CPU
through the C attention kernel (``edtir.models.cpu_kernel``); the path ``fast-eager`` is the fast path without
them, PyTorch's ops only (``--paths reference,fast-eager,fast``).

    python benchmarks/perf_suite.py --device cpu             # CPU workloads, 2 threads (a few minutes quiet)
    python benchmarks/perf_suite.py --device cuda            # GPU workloads (H100/H200)
    python benchmarks/perf_suite.py --device cpu --quick     # smoke run of every workload at tiny sizes
    python benchmarks/perf_suite.py --device cuda --workloads b-240x360 --compile default

Workloads (random weights: speed does not depend on them; set5 uses the bundled trained EDT-T):
  b-240x360  EDT-B SR x2, 240x360 LR, batch 1                      (GPU)
  b-480x720  EDT-B SR x2, 480x720 LR, batch 1                      (GPU)
  b-train    EDT-B SR x2 training step, batch 32, LR patch 48      (GPU; benchmarks/train_speed.py's step)
  b-4k       EDT-B SR x4 of 960x540 (a 4K output) through tiling   (GPU: peak GPU memory; CPU: peak RSS)
  b-4k-auto  the same, tiles chosen by edtir for a 3.5 GiB budget  (GPU)
  b-72       EDT-B SR x2, 72x72 LR                                 (CPU)
  t-256      EDT-T SR x2, 256x256 LR (padded to 264 as edtir.restore does)  (CPU)
  t-128      EDT-T SR x2, 128x128 LR: a 256x256 output (padded to 144)  (CPU)
  set5       Set5 SR x2 with edt-t-sr-x2-291: PSNR in bf16 against fp32 (the issue's <= 0.01 dB)

Timing: paths are interleaved (reference, fast, reference, fast, ...) in one process, so a busy machine slows both
alike; median and min of ``--repeats`` runs after a warm-up. Peak memory: CUDA ``max_memory_allocated``; on the
CPU the peak resident set of a fresh process that runs the cell once (VmHWM, torch included). TFLOP/s
count the model's arithmetic (``edtir.models.profile.macs_per_pixel``: 2 FLOP per MAC, on the nominal image for
tiling, 3x the forward pass for training). Floors: CPU 270 GFLOP/s for 2 cores (a plain matrix product on the
development VM; scaled by threads/2), GPU bf16 788 TFLOP/s, GPU fp32 (TF32 off) 60 TFLOP/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from memory_stats import peak_rss_mib

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[0].parent / "shared" / "data"
FLOOR = {("cpu", "fp32"): 270e9, ("cpu", "bf16"): 270e9, ("cuda", "fp32"): 60e12, ("cuda", "bf16"): 788e12}
TOL = 1e-4

#: name -> (devices, description, settings); ``quick`` replaces the settings for a smoke run
WORKLOADS = {
    "b-240x360": (("cuda",), "EDT-B x2 240x360", dict(size="B", task="sr-x2", hw=(240, 360))),
    "b-480x720": (("cuda",), "EDT-B x2 480x720", dict(size="B", task="sr-x2", hw=(480, 720))),
    "b-train": (("cuda",), "EDT-B x2 train b32 p48", dict(size="B", task="sr-x2", train=(32, 48))),
    "b-4k": (("cuda", "cpu"), "EDT-B x4 960x540 tiled", dict(size="B", task="sr-x4", hw=(540, 960), tiled=True)),
    "b-4k-auto": (("cuda",), "EDT-B x4 960x540 auto 3.5G", dict(size="B", task="sr-x4", hw=(540, 960), tiled=True,
                                                                memory_limit="3.5G")),
    "b-72": (("cpu",), "EDT-B x2 72x72", dict(size="B", task="sr-x2", hw=(72, 72))),
    "t-256": (("cpu",), "EDT-T x2 256x256", dict(size="T", task="sr-x2", hw=(256, 256))),
    "t-128": (("cpu",), "EDT-T x2 128x128", dict(size="T", task="sr-x2", hw=(128, 128))),
    "set5": (("cuda", "cpu"), "Set5 x2 edt-t-sr-x2-291", dict(quality="edt-t-sr-x2-291")),
}
QUICK = {"b-train": dict(train=(2, 24)), "b-4k": dict(hw=(60, 100), tile=48), "set5": dict(crop=96),
         "b-4k-auto": dict(hw=(60, 100), memory_limit="20M")}
#: tile (LR side) and tiles per forward pass for the 4K workload
TILING = {"cuda": (240, 8), "cpu": (120, 1)}


def matmul_peak(device, dtype=torch.float32) -> float:
    """FLOP/s of a large square matrix product on this device (the best of 3): what a floor can assume here."""
    n = 4096 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def amp(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def settings(name: str, quick: bool) -> dict:
    s = dict(WORKLOADS[name][2])
    s["label"] = WORKLOADS[name][1]
    if quick:  # EDT-T at tiny sizes: every code path, in seconds
        s.update(QUICK.get(name, {}))
        if "size" in s:
            s["size"] = "T"
        if "hw" in s and not s.get("tiled"):
            s["hw"] = (24, 48)
        s["label"] = "quick: " + (f"EDT-T {s['task']} " + ("train b{} p{}".format(*s["train"]) if "train" in s
                                  else "{}x{}".format(*s["hw"])) if "size" in s else "Set5 crop")
    return s


def build(s, device):
    from edtir.models.edt import build_model

    torch.manual_seed(0)
    return build_model(s["size"], [s["task"]]).to(device).eval()


def flops(model, s, batch=1) -> float:
    from edtir.models.profile import macs_per_pixel

    macs = macs_per_pixel(model, s["task"])
    if "train" in s:
        b, p = s["train"]
        return 3 * 2 * macs * b * p * p
    return 2 * macs * s["hw"][0] * s["hw"][1] * batch


def runner(model, s, device, precision, tile_cfg):
    """A callable doing one unit of the workload (one forward pass or one tiled restore) and returning its output.
    The input is the same for every path and precision (a fixed seed)."""
    from edtir.inference import forward_padded, restore

    x = torch.rand(1, 3, *s["hw"], generator=torch.Generator().manual_seed(1))
    if s.get("memory_limit"):  # edtir's own tiling: the largest tile whose estimated memory fits the budget
        return lambda: restore(model, x, task=s["task"], device=device, precision=precision,
                               memory_limit=s["memory_limit"])
    if s.get("tiled"):
        tile, tile_batch = tile_cfg
        return lambda: restore(model, x, task=s["task"], tile=tile, tile_batch=tile_batch, device=device,
                               precision=precision)
    x = x.to(device)

    def run():
        with torch.inference_mode(), amp(device, precision):
            return forward_padded(model, x, s["task"])
    return run


def time_paths(run_by_path, device, repeats, warmup, errors=None):
    """{path: (times, first output)} with the paths interleaved. A path whose first run fails (a CUDA graph that
    does not capture, say) is left out, its error in ``errors``, and the others go on."""
    out = {}
    for path, run in list(run_by_path.items()):
        try:
            with path_mode(path):
                out[path] = run().float().cpu()
                for _ in range(warmup - 1):
                    run()
        except Exception as e:
            if errors is None:
                raise
            errors[path] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    run_by_path = {p: r for p, r in run_by_path.items() if p in out}
    times = {p: [] for p in run_by_path}
    for _ in range(repeats):
        for path, run in run_by_path.items():
            with path_mode(path):
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                times[path].append(time.perf_counter() - t0)
    return {p: (times[p], out[p]) for p in run_by_path}


def cuda_peak(run, path, device) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with path_mode(path):
        run()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def child_cell(args) -> dict:
    """One run of one cell in this fresh process: seconds and the peak resident set (CPU memory)."""
    name, path, precision = args.child.split(":")
    device = torch.device(args.device)
    s = settings(name, args.quick)
    model = build(s, device)
    tile_cfg = (s.get("tile", TILING[device.type][0]), TILING[device.type][1])
    run = runner(model, s, device, precision, tile_cfg)
    with path_mode(path):
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def child_rss(name, path, precision, args) -> dict:
    cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
           "--child", f"{name}:{path}:{precision}"] + (["--quick"] if args.quick else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------

def row(name, path, prec, med=None, mn=None, speedup=None, mem=None, tflops=None, floor=None, check=""):
    def f(v, fmt):
        ok = isinstance(v, (int, float)) and v == v  # not None, not NaN
        return format(v, fmt) if ok else format("-", ">" + fmt.split(".")[0])
    return (f"{name:<30}{path:<20}{prec:<6}{f(med, '10.4f')}{f(mn, '10.4f')}{f(speedup, '8.2f')}"
            f"{f(mem, '10.0f')}{f(tflops, '10.4f')}{f(floor, '8.1f')}  {check}")


HEADER = (f"{'workload':<30}{'path':<20}{'prec':<6}{'median s':>10}{'min s':>10}{'vs ref':>8}{'peak MiB':>10}"
          f"{'TFLOP/s':>10}{'x floor':>8}  check")


def inference_rows(name, s, device, precisions, paths, args):
    model = build(s, device)
    flop = flops(model, s)
    tile_cfg = (s.get("tile", TILING[device.type][0]), TILING[device.type][1])
    cpu_tiled = s.get("tiled") and device.type == "cpu"
    ref_fp32 = None
    for prec in precisions:
        runs = {p: runner(model if p != "fast+compile" else compiled(model, args), s, device, prec, tile_cfg)
                for p in paths}
        runs = {p: graphed(run, device) if p.endswith("+graph") else run for p, run in runs.items()}
        if cpu_tiled:  # minutes per run on the CPU: one run per path, in its own process (time and memory)
            res = {p: child_rss(name, p, prec, args) for p in paths}
            times = {p: ([r["seconds"]], None) for p, r in res.items() if "seconds" in r}
        else:
            errors = {}
            times = time_paths({p: runs[p] for p in paths}, device, args.repeats, args.warmup, errors)
            res = {p: {"error": e} for p, e in errors.items()}
        ref_fp32 = ref_fp32 if ref_fp32 is not None or "reference" not in times else times["reference"][1]
        for p in paths:
            if p not in times:
                print(row(s["label"], p, prec, check=res[p]["error"]), flush=True)
                continue
            t, out = times[p]
            med = statistics.median(t)
            ref_med = statistics.median(times["reference"][0]) if "reference" in times else None
            if device.type == "cuda":
                mem = cuda_peak(runs[p], p, device)
            elif cpu_tiled:
                mem = res[p]["peak_rss_mib"]
            else:
                mem = child_rss(name, p, prec, args).get("peak_rss_mib") if args.rss and not args.quick else None
            check = ""
            if out is not None and ref_fp32 is not None:
                d = (out - ref_fp32).abs().max().item()
                ok = "ok" if prec == "bf16" or d <= TOL else "FAIL"
                check = f"max|out - ref fp32| {d:.1e}" + ("" if prec == "bf16" else f" {ok}")
            peak = FLOOR[device.type, prec] * (args.threads / 2 if device.type == "cpu" else 1)
            print(row(s["label"], p, prec, med, min(t), ref_med / med if ref_med else None, mem,
                      flop / med / 1e12, med / (flop / peak), check), flush=True)


def graphed(run, device):
    """``run`` replayed from a CUDA graph, captured at its first call (after two calls on a side stream: kernels
    compiled, weights laid out): no launch costs, the same input each time, as in a restore of same-sized tiles."""
    state = {}  # main() accepts +graph paths on CUDA only

    def replay():
        if "graph" not in state:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                run()
                run()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = run()
            state["graph"] = graph
        state["graph"].replay()
        return state["out"]
    return replay


def compiled(model, args):
    """A copy of the model with each block compiled (``edt.compile_blocks``); the other paths keep the eager one."""
    import copy

    from edtir.models.edt import compile_blocks

    return compile_blocks(copy.deepcopy(model), None if args.compile == "default" else args.compile)


PATH_OPTIONS = ("eager", "cublas", "ffn", "all", "norms", "tf32x3", "ieee", "rows2", "rows4")


def path_mode(path: str):
    """The formulation a path runs, as a context: ``fast`` uses the fused Triton kernels (CUDA inference) and the C
    attention kernel (CPU fp32 inference) where they serve, ``fast-eager`` is the fast path without them,
    ``fast+compile`` the fast path compiled. More options after a dash set the Triton kernels' settings for the
    path (``fast-tf32x3``, ``fast-cublas-tf32x3``): ``cublas`` / ``ffn`` / ``all`` / ``norms`` which products run
    in Triton (``EDTIR_TRITON_PRODUCTS`` none / ffn / all / norms), ``tf32x3`` / ``ieee`` how the kernels multiply fp32
    (``EDTIR_FP32_PRODUCTS``)."""
    from edtir.models import cpu_kernel, kernels
    from edtir.models.edt import attention_mode

    head, *suffixes = path.split("+")
    base, *options = head.split("-")
    bad = [o for o in options if o not in PATH_OPTIONS]
    if bad:
        raise SystemExit(f"path {path!r}: unknown option {bad[0]!r} (options: {', '.join(PATH_OPTIONS)})")
    if [x for x in suffixes if x not in ("compile", "graph")] or len(suffixes) > 1:
        raise SystemExit(f"path {path!r}: expected at most one of the suffixes +compile, +graph")
    products = next(({"cublas": "none"}.get(o, o) for o in options if o in ("cublas", "ffn", "all", "norms")), None)
    fp32 = next((o for o in options if o in ("tf32x3", "ieee")), None)
    rows = next((int(o[4:]) for o in options if o.startswith("rows")), None)
    stack = contextlib.ExitStack()
    stack.enter_context(attention_mode(base))
    stack.enter_context(kernels.enabled("eager" not in options))
    stack.enter_context(kernels.settings(products, fp32, rows))
    stack.enter_context(cpu_kernel.enabled("eager" not in options))
    return stack


def train_rows(name, s, device, precisions, paths, args):
    sys.path.insert(0, str(HERE))
    from train_speed import bench

    from edtir.models.edt import build_model

    batch, patch = s["train"]
    flop = flops(build_model(s["size"], [s["task"]]), s)
    steps, warmup = (1, 1) if args.quick else (10, 3)
    for prec in precisions:
        res = {}
        for p in paths:
            if p == "fast+compile" or p.endswith("-eager"):  # training runs neither compiled nor fused kernels
                continue
            with path_mode(p):
                try:
                    res[p] = bench(s["size"], s["task"], batch, patch, device, prec == "bf16", warmup, steps, 0.1)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    res[p] = None
        for p, r in res.items():
            if r is None:
                print(row(s["label"], p, prec, check="out of memory"), flush=True)
                continue
            sec = r["s_per_step"]
            ref = res.get("reference")
            peak = FLOOR[device.type, prec] * (args.threads / 2 if device.type == "cpu" else 1)
            print(row(s["label"], p, prec, sec, None, ref["s_per_step"] / sec if ref else None,
                      r["mem_gib"] * 1024, flop / sec / 1e12, sec / (flop / peak),
                      f"{r['patches_per_s']:.1f} patches/s"), flush=True)


def quality_rows(name, s, device, precisions, paths, args):
    from edtir import load_model, zoo
    from edtir.evaluate import evaluate_folder

    folder = DATA / "Set5"
    if not folder.is_dir():
        print(row(s["label"], "-", "-", check=f"skipped: {folder} not found"))
        return
    model = load_model(zoo.path_of(s["quality"]), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        if s.get("crop"):  # quick: one small crop of one image
            from edtir.data.io import read_image, write_image

            c = s["crop"]
            write_image(Path(tmp) / "head.png", read_image(folder / "head.png")[:c, :c])
            folder = Path(tmp)
        base = None
        for prec in precisions:
            for p in (q for q in paths if "+" not in q):  # compiled or graphed: fixed sizes
                with path_mode(p):
                    r = evaluate_folder(model, "sr-x2", folder, device=device, precision=prec, progress=False)
                base = r["psnr"] if base is None else base
                print(row(s["label"], p, prec, r["seconds"], check=f"PSNR {r['psnr']:.3f} dB, "
                          f"{r['psnr'] - base:+.4f} vs the first row"), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workloads", help="comma list (default: every workload for the device)")
    ap.add_argument("--paths", default="reference,fast",
                    help="comma list of reference, fast, fast-eager (the fast path without the Triton and C kernels); "
                         "fast-OPTION[-OPTION] sets the Triton kernels' products (see path_mode), e.g. fast-tf32x3")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--threads", type=int, help="CPU threads (default 2; 1 with --quick)")
    ap.add_argument("--repeats", type=int, help="timed runs per cell (default 3 CPU, 5 GPU; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1 CPU, 2 GPU)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of every workload with EDT-T at tiny sizes (no fresh-process memory runs)")
    ap.add_argument("--no-rss", dest="rss", action="store_false",
                    help="CPU: skip the fresh-process peak-memory runs (the tiled 4K keeps them)")
    ap.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"),
                    help="add a 'fast+compile' path: the fast path with each block torch.compile'd (reduce-overhead: "
                         "CUDA graphs, which fail on the GPU: the blocks share one graph)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    args.threads = args.threads or (1 if args.quick else 2)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the floor assumes no TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    if args.child:
        print(json.dumps(child_cell(args)))
        return 0
    gpu = device.type == "cuda"
    args.repeats = args.repeats or (1 if args.quick else 5 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    names = args.workloads.split(",") if args.workloads else [
        n for n, (devs, _, _) in WORKLOADS.items() if args.quick or device.type in devs]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"unknown workload {unknown[0]!r}; expected one of: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    paths = args.paths.split(",") + (["fast+compile"] if args.compile else [])
    for p in paths:  # an unknown option fails here, before any work
        with path_mode(p):
            pass
        if p.endswith("+graph") and not gpu:
            print(f"path {p!r}: CUDA graph replay needs --device cuda", file=sys.stderr)
            return 2
    precisions = args.precisions.split(",")
    where = torch.cuda.get_device_name(device) if gpu else \
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {where}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; load average {load:.1f} "
          f"on {os.cpu_count()} CPUs{'; QUICK (tiny sizes)' if args.quick else ''}")
    if not gpu:
        from edtir.models import cpu_kernel

        print(f"# C kernels: {cpu_kernel.status()}")
    if not args.quick:
        peaks = [f"{p}: {matmul_peak(device, dt) / 1e12:.3f} TFLOP/s" for p, dt in
                 (("fp32", torch.float32), ("bf16", torch.bfloat16)) if p in precisions]
        print(f"# measured square matmul here: {', '.join(peaks)}; the 'x floor' column uses the issue's floors "
              f"({', '.join(f'{p} {FLOOR[device.type, p] / 1e12:g}' for p in precisions)} TFLOP/s"
              f"{', for 2 threads' if device.type == 'cpu' else ''})")
    print(HEADER)
    for name in names:
        s = settings(name, args.quick)
        rows = train_rows if "train" in s else quality_rows if "quality" in s else inference_rows
        try:
            rows(name, s, device, precisions, paths, args)
        except Exception as e:  # one broken cell must not cost a lent GPU's whole run
            print(row(s["label"], "-", "-", check=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}"),
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if hasattr(os, "getloadavg"):
        print(f"# load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
