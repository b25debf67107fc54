"""Forward time of the model code at an older git revision against the working tree's, interleaved in one process
(old, new, old, new, ...) with identical weights, so a busy machine slows both alike. Reports wall and CPU time
(CPU time is what to compare on a shared machine: it leaves out the time spent waiting for a core).

    python benchmarks/compare_revision.py                          # 52c93f3 (before the fast path), EDT-B x2 72x72
    python benchmarks/compare_revision.py --size T --input 256 --threads 1 --rounds 3
    python benchmarks/compare_revision.py --rev HEAD~3 --paths fast,reference

The old ``edt.py`` is read with ``git show REV:src/edtir/models/edt.py`` and imported on its own; both models run
with the C allocator tuned as the current code tunes it (``edtir.models.edt.tune_cpu_allocator``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def old_module(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:src/edtir/models/edt.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "edt_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("edt_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["edt_old"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="52c93f3", help="git revision of the old model code (default 52c93f3)")
    ap.add_argument("--size", default="B")
    ap.add_argument("--task", default="sr-x2")
    ap.add_argument("--input", type=int, default=72, help="input side (padded to the size multiple)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--paths", default="fast", help="current-code paths to time: fast, reference (comma list)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from edtir.inference import forward_padded
    from edtir.models import edt

    edt.tune_cpu_allocator()
    old = old_module(args.rev)
    torch.manual_seed(0)
    new = edt.build_model(args.size, [args.task]).eval()
    prev = old.build_model(args.size, [args.task]).eval()
    prev.load_state_dict(new.state_dict())
    x = torch.rand(1, 3, args.input, args.input)

    def runner(model, path):
        def run():
            with edt.attention_mode(path):
                return forward_padded(model, x, args.task)
        return run

    variants = {args.rev: runner(prev, "fast")} | {p: runner(new, p) for p in args.paths.split(",")}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    with torch.inference_mode():
        outs = {k: run() for k, run in variants.items()}  # warm-up, and the outputs to compare
        for _ in range(args.rounds):
            for k, run in variants.items():
                c, w = time.process_time(), time.perf_counter()
                run()
                wall[k].append(time.perf_counter() - w)
                cpu[k].append(time.process_time() - c)
    print(f"# EDT-{args.size} {args.task} {args.input}x{args.input}, {args.threads} threads, {args.rounds} rounds "
          f"interleaved; torch {torch.__version__}")
    print(f"{'code':<12}{'wall median':>12}{'wall min':>10}{'CPU median':>12}{'CPU min':>10}{'speed-up (CPU)':>16}"
          f"{'max |out - old|':>17}")
    base = statistics.median(cpu[args.rev])
    for k in variants:
        print(f"{k:<12}{statistics.median(wall[k]):>12.3f}{min(wall[k]):>10.3f}{statistics.median(cpu[k]):>12.3f}"
              f"{min(cpu[k]):>10.3f}{base / statistics.median(cpu[k]):>16.2f}"
              f"{(outs[k] - outs[args.rev]).abs().max().item():>17.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
