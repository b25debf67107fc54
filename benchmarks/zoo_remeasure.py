"""Re-measure bundled models on their test sets and compare with the registry (and so with the README, whose tables
are written from it): the acceptance check of the model zoo. Same code as ``edtir eval`` and the bundler.

    python benchmarks/zoo_remeasure.py                         # every model, every task, every test set
    python benchmarks/zoo_remeasure.py --defaults              # only each task's default model
    python benchmarks/zoo_remeasure.py --models edt-t-sr-x2-v4-291 --sets Set5 [--tolerance 0.01]

Prints one row per (model, task, test set): registry PSNR / SSIM, re-measured, difference. Exits 1 when a PSNR
differs by more than ``--tolerance`` dB (default 0.01) or an SSIM by more than 0.001, or when nothing was
measured. On the 2-core CPU VM at two threads, ``--defaults`` (20 rows) took 552 s, the whole zoo (10 models, 43
rows) 1,238 s (1,807 s beside a CI run, with the 2026-11-27 defaults).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edtir import zoo
from edtir.errors import UsageError, run_script
from edtir.zoo.bundle import machine, measure

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help="bundled model names (default: all)")
    ap.add_argument("--defaults", action="store_true", help="only the default model of each task")
    ap.add_argument("--sets", nargs="+", help="only these test sets (e.g. Set5 CBSD68)")
    ap.add_argument("--data-root", type=Path, default=DATA)
    ap.add_argument("--tolerance", type=float, default=0.01, help="largest PSNR difference accepted, dB")
    args = ap.parse_args()
    reg = zoo.registry()
    names = args.models or list(reg)
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise UsageError(f"not a bundled model: {unknown[0]} (see `edtir models`)")
    tasks_of = {n: [t for t in reg[n]["scores"] if not args.defaults or t in reg[n]["default_for"]] for n in names}
    known = [s for sets in zoo.TEST_SETS.values() for s in sets]
    odd = [s for s in args.sets or [] if s not in known]
    if odd:
        raise UsageError(f"not a test set: {odd[0]} (expected some of: {' '.join(known)})")
    if not args.data_root.is_dir():
        raise UsageError(f"no test data at {args.data_root} (give --data-root)")

    print(f"# {machine()}; registry scores against re-measured ones (PSNR dB / SSIM)")
    print(f"{'model':<28}{'task':<14}{'set':<10}{'registry':>16}{'now':>16}{'dPSNR':>8}{'dSSIM':>8}")
    worst, bad, rows, t0 = 0.0, 0, 0, time.perf_counter()
    for name, tasks in tasks_of.items():
        if not tasks:
            continue
        scores = measure(zoo.get_model(name), tasks, args.data_root, only=args.sets, verbose=False)
        for task, now in scores.items():
            for dataset in (s for s in zoo.test_sets(task) if s not in now and (not args.sets or s in args.sets)):
                print(f"{name:<28}{task:<14}{dataset:<10}  not found under {args.data_root}, skipped")
            for dataset, r in now.items():
                want = reg[name]["scores"][task][dataset]
                dp, ds = r["psnr"] - want["psnr"], r["ssim"] - want["ssim"]
                worst = max(worst, abs(dp))
                off = abs(dp) > args.tolerance or abs(ds) > 0.001
                bad += off
                rows += 1
                print(f"{name:<28}{task:<14}{dataset:<10}{want['psnr']:>9.4f}/{want['ssim']:.4f}"
                      f"{r['psnr']:>9.4f}/{r['ssim']:.4f}{dp:>+8.4f}{ds:>+8.4f}{'  <- differs' if off else ''}",
                      flush=True)
    print(f"# largest |dPSNR| {worst:.4f} dB; {bad} row(s) beyond the tolerance; "
          f"{time.perf_counter() - t0:.0f} s")
    if not rows:
        print("# nothing was measured: no chosen test set under the data root, or no model does those tasks")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
