"""Re-measure bundled models on their test sets and compare with the registry (and so with the README, whose tables
are written from it): the acceptance check of the model zoo. Same code as ``edtir eval`` and the bundler.

    python benchmarks/zoo_remeasure.py                         # every model, every task, every test set
    python benchmarks/zoo_remeasure.py --defaults              # only each task's default model
    python benchmarks/zoo_remeasure.py --models edt-t-sr-x2-v2-291 --sets Set5 [--tolerance 0.01]

Prints one row per (model, task, test set): registry PSNR / SSIM, re-measured, difference. Exits 1 when a PSNR
differs by more than ``--tolerance`` dB (default 0.01) or an SSIM by more than 0.001. Whole zoo on the 2-core CPU:
most of an hour at two threads; the defaults alone about a third of that.
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
    pairs = [(n, t) for n in names for t in reg[n]["scores"]]
    if args.defaults:
        pairs = [(n, t) for n, t in pairs if t in reg[n]["default_for"]]
    if not args.data_root.is_dir():
        raise UsageError(f"no test data at {args.data_root} (give --data-root)")

    print(f"# {machine()}; registry scores against re-measured ones (PSNR dB / SSIM)")
    print(f"{'model':<28}{'task':<14}{'set':<10}{'registry':>16}{'now':>16}{'dPSNR':>8}{'dSSIM':>8}")
    worst, bad, t0 = 0.0, 0, time.perf_counter()
    for name, task in pairs:
        model = zoo.get_model(name)
        now = measure_quietly(model, task, args.data_root, args.sets)
        for dataset in (s for s in zoo.test_sets(task) if s not in now and (not args.sets or s in args.sets)):
            print(f"{name:<28}{task:<14}{dataset:<10}  not found under {args.data_root}, skipped")
        for dataset, r in now.items():
            want = reg[name]["scores"][task][dataset]
            dp, ds = r["psnr"] - want["psnr"], r["ssim"] - want["ssim"]
            worst = max(worst, abs(dp))
            off = abs(dp) > args.tolerance or abs(ds) > 0.001
            bad += off
            print(f"{name:<28}{task:<14}{dataset:<10}{want['psnr']:>9.4f}/{want['ssim']:.4f}"
                  f"{r['psnr']:>9.4f}/{r['ssim']:.4f}{dp:>+8.4f}{ds:>+8.4f}{'  <- differs' if off else ''}",
                  flush=True)
    print(f"# largest |dPSNR| {worst:.4f} dB; {bad} row(s) beyond the tolerance; "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


def measure_quietly(model, task: str, data_root: Path, only) -> dict:
    """The bundler's measurement of one task, restricted to ``only`` test sets (all when None)."""
    import contextlib
    import io
    import tempfile

    sets = [s for s in zoo.test_sets(task) if not only or s in only]
    with tempfile.TemporaryDirectory() as tmp:  # a data root holding just the chosen sets
        for s in sets:
            if (data_root / s).is_dir():
                (Path(tmp) / s).symlink_to((data_root / s).resolve())
        with contextlib.redirect_stdout(io.StringIO()):
            return measure(model, [task], Path(tmp))[task]


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
