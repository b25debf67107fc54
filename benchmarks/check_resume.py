"""Kill-and-resume check: a run killed with SIGKILL at random moments and restarted with ``--resume`` must end
with the same bytes as an uninterrupted run.

    python benchmarks/check_resume.py                       # configs/cpu-sr-x2.yaml, 30 iterations, 4 trials
    python benchmarks/check_resume.py --trials 8 --kills 3 --work /tmp/resume-check

Each trial starts ``edtir train CONFIG --output-dir D --iterations N``, kills its whole process group (the
trainer and its data workers) with SIGKILL after a random delay, restarts it with ``--resume``, possibly kills it
again, and at the end compares ``D/model.safetensors`` with the reference byte for byte and tensor by tensor.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def command(cfg: str, out: Path, iterations: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "edtir", "train", cfg, "--output-dir", str(out), "--iterations", str(iterations),
           "--no-progress"]
    return cmd + (["--resume"] if resume else [])


def run(cmd: list[str], kill_after: float | None) -> tuple[bool, float]:
    """(finished, seconds). Kills the process group after ``kill_after`` seconds if it is still running."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return False, time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.read().decode()[-2000:]}")
    return True, time.perf_counter() - t0


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                        and bool((x[k] == y[k]).all()) for k in x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu-sr-x2.yaml")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--kills", type=int, default=2, help="at most this many kills per trial (at least one)")
    ap.add_argument("--work", default="/tmp/edtir-resume-check")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill times (default: random)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    ref = work / "reference"
    print(f"reference run: {args.config}, {args.iterations} iterations (kill-time seed {seed})", flush=True)
    _, total = run(command(args.config, ref, args.iterations, False), None)
    print(f"  {total:.1f} s", flush=True)

    results = []
    for trial in range(args.trials):
        out = work / f"trial{trial}"
        kills = rnd.randint(1, args.kills)
        times, resume, finished = [], False, False
        while not finished:
            delay = rnd.uniform(0.5, total) if len(times) < kills else None
            finished, took = run(command(args.config, out, args.iterations, resume), delay)
            if not finished:
                steps = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if out.exists() else []
                times.append(f"{took:.1f}s ({steps[-1] if steps else 'no checkpoint'})")
            resume = True
        identical = (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
        tensors = same_tensors(out / "model.safetensors", ref / "model.safetensors")
        results.append(identical and tensors)
        print(f"trial {trial}: killed at {', '.join(times)}; file bytes identical: {identical}; "
              f"tensors identical: {tensors}", flush=True)
    print(f"{sum(results)}/{len(results)} trials identical to the uninterrupted run")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
