"""Kill-and-resume check: a run killed with SIGKILL at random moments and restarted with ``--resume`` must end
with the same bytes as an uninterrupted run.

    python benchmarks/check_resume.py                       # configs/cpu-sr-x2.yaml, 30 iterations, 4 trials
    python benchmarks/check_resume.py --trials 8 --kills 3 --work /tmp/resume-check

Each trial starts ``edtir train CONFIG --output-dir D --iterations N``, kills its whole process group (the
trainer and its data workers) with SIGKILL at a random moment (a random step, then a random fraction of that
step: mid-step, mid-checkpoint or mid final write), restarts it with ``--resume``, possibly kills it again, and
at the end compares ``D/model.safetensors`` with the reference byte for byte and tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
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
           "--no-progress", "log.every=1"]  # a log line per step tells where the run is (weights unaffected)
    return cmd + (["--resume"] if resume else [])


def logged_step(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def run(cmd: list[str], out: Path, kill_step: int | None, rnd: random.Random, start: int = 0
        ) -> tuple[bool, str]:
    """Run ``cmd``; when ``kill_step`` is given, SIGKILL its process group at a random moment of the step after
    step ``kill_step`` was logged (which may be mid-checkpoint or mid final write). (finished, what happened)."""
    err = open(out.parent / f"{out.name}.stderr", "ab")  # noqa: SIM115
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    seen, seen_t, step_time = logged_step(out), time.monotonic(), None
    armed = False  # a resumed run first cuts the log back to its checkpoint: count steps only after that
    while p.poll() is None:
        if kill_step is not None:
            n = logged_step(out)
            if not armed:
                if n > start:
                    time.sleep(0.01)
                    continue
                armed, seen, seen_t = True, n, time.monotonic()
            if n != seen:
                now = time.monotonic()
                step_time = (now - seen_t) / max(1, n - seen) if seen else None
                seen, seen_t = n, now
            if n >= kill_step:
                frac = rnd.random()
                time.sleep(frac * (step_time or 1.0))
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return False, f"step {n} + {frac:.2f} of a step"
        time.sleep(0.01)
    err.close()
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}; see {err.name}")
    return True, "finished"


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
    work.mkdir(parents=True)
    print(f"reference run: {args.config}, {args.iterations} iterations (kill-time seed {seed})", flush=True)
    t0 = time.perf_counter()
    run(command(args.config, ref, args.iterations, False), ref, None, rnd)
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)

    results = []
    for trial in range(args.trials):
        out = work / f"trial{trial}"
        kills = rnd.randint(1, args.kills)
        times, resume, finished = [], False, False
        while not finished:
            done = [p.name for p in (out / "checkpoints").glob("step_*")] if out.exists() else []
            start = int(max(done)[5:]) if done else 0
            target = rnd.randint(start, args.iterations) if len(times) < kills else None
            finished, what = run(command(args.config, out, args.iterations, resume), out, target, rnd, start)
            if not finished:
                times.append(f"{what} (that run had started from step {start})")
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
