"""Bundle a trained model into the zoo: write its weights as fp16 safetensors (half the size; loaded back to fp32)
and measure its scores on every test set of its tasks with the code of ``edtir eval``, into a registry entry.

    python -m edtir.zoo.bundle runs/zoo-t-multi/model.safetensors --name edt-t-multi-291 \\
        --default-for sr-x3,sr-x4 --steps 1500 --config configs/zoo-edt-t-multi.yaml \\
        --command "edtir train configs/zoo-edt-t-multi.yaml --output-dir runs/zoo-t-multi" \\
        --data "291 (T91 + BSD200 train)" --description "..." [--zoo DIR] [--data-root ../shared/data]

It prints each score as it goes and writes ``<zoo>/<name>.safetensors`` and the entry in ``<zoo>/registry.json``
(an existing entry of that name is replaced; its defaults move to the new one when ``--default-for`` says so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

from . import test_sets, validate, zoo_dir


def machine() -> str:
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__.split('+')[0]}"
    import os

    n = torch.get_num_threads()
    return (f"CPU: {os.cpu_count()}-core {platform.machine()}, torch {torch.__version__.split('+')[0]} "
            f"({n} thread{'' if n == 1 else 's'})")


def measure(model, tasks, data_root: Path, device="cpu", *, only=None, verbose: bool = True) -> dict:
    """{task: {set: {"psnr", "ssim", "images"}}} over the test sets of each task (those present; of them, only
    the sets named in ``only`` when given). ``verbose`` prints each score and each missing set as it goes."""
    from ..evaluate import evaluate_folder

    scores = {}
    for task in tasks:
        scores[task] = {}
        for name in test_sets(task):
            if only and name not in only:
                continue
            folder = data_root / name
            if not folder.is_dir():
                if verbose:
                    print(f"  {task} {name}: not found under {data_root}, skipped", flush=True)
                continue
            r = evaluate_folder(model, task, folder, device=device, progress=False)
            if r["failed"]:
                raise SystemExit(f"{task} {name}: {len(r['failed'])} image(s) failed: {r['failed'][0]}")
            scores[task][name] = {"psnr": round(r["psnr"], 4), "ssim": round(r["ssim"], 4), "images": r["images"]}
            if verbose:
                print(f"  {task:<13}{name:<10}{r['psnr']:8.4f}{r['ssim']:8.4f}  ({r['images']} images, "
                      f"{r['seconds']:.0f} s)", flush=True)
    return scores


def eval_command(name: str, task: str, sets) -> str:
    return f"edtir eval --task {task} --model {name} " + " ".join(f"--data ../shared/data/{s}" for s in sets)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edtir.zoo.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="the trained checkpoint (.safetensors or .pth)")
    p.add_argument("--name", required=True)
    p.add_argument("--default-for", default="", help="comma-separated tasks this model becomes the default for")
    p.add_argument("--tasks", help="keep only these tasks (default: all of the checkpoint's)")
    p.add_argument("--steps", type=int, required=True, help="training iterations")
    p.add_argument("--config", required=True, help="the training config (configs/...); stages as 'A, then B'")
    p.add_argument("--command", required=True, help="the exact training command(s)")
    p.add_argument("--trained-on", default="", help="where it was trained (e.g. 'one NVIDIA H200')")
    p.add_argument("--data", required=True, help="what it was trained on")
    p.add_argument("--description", required=True)
    p.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: $EDTIR_ZOO or the bundled one)")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-measure", action="store_true", help="write the file and entry without scores")
    args = p.parse_args(argv)

    from ..models.checkpoint import load_model, save_model

    zoo = args.zoo or zoo_dir()
    dst = zoo / f"{args.name}.safetensors"
    model = load_model(args.weights, tasks=args.tasks.split(",") if args.tasks else None)
    save_model(model.half(), dst, metadata={"dtype": "float16", "name": args.name})
    model = load_model(dst, device=args.device)  # measure exactly what ships: fp16 weights read back as fp32
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB, {model.info.params:,} parameters)", flush=True)
    scores = {} if args.skip_measure else measure(model, model.tasks, args.data_root, args.device)
    reg_path = zoo / "registry.json"
    reg = json.loads(reg_path.read_text()) if reg_path.exists() else {}
    default_for = [t for t in args.default_for.split(",") if t]
    for other in reg.values():  # the new model takes over the tasks it is made the default for
        other["default_for"] = [t for t in other.get("default_for", []) if t not in default_for]
    reg[args.name] = {
        "file": dst.name,
        "arch": f"EDT-{model.info.size}" if model.info.size else "EDT",
        "params": model.info.params,
        "tasks": list(model.tasks),
        "default_for": default_for,
        "dtype": "float16",
        "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
        "description": args.description,
        "data": args.data,
        "steps": args.steps,
        "recipe": {"config": args.config, "command": args.command, "trained_on": args.trained_on},
        "scores": scores,
        "measured": {"commands": [eval_command(args.name, t, list(s)) for t, s in scores.items()],
                     "machine": machine(), "weights": "the bundled fp16 file, loaded to fp32"},
    }
    validate(reg, str(reg_path))
    from ..data.io import atomic_write_bytes

    text = json.dumps(reg, indent=2) + "\n"
    atomic_write_bytes(reg_path, lambda tmp: Path(tmp).write_text(text))
    print(f"updated {reg_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
