"""``edtir eval``: PSNR/SSIM of a model on benchmark folders by the field's conventions (see
``edtir.evaluate``), as a table, JSON and per-image CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

from ..errors import EdtirError, UsageError
from .common import add_device_args, add_inference_args, add_model_args, check_inference_args, resolve_device


def register(sub) -> None:
    p = sub.add_parser("eval", help="PSNR/SSIM on benchmark folders (published protocols)",
                       description="Evaluate a model on data folders by the protocol of a task (SR: Y "
                                   "channel, crop = scale, MATLAB bicubic LR; denoising: RGB, seeded noise; "
                                   "deraining: Y, rainy/ + clean/). Example: `edtir eval --task sr-x2 "
                                   "--model bicubic --data ../shared/data/Set5 --data ../shared/data/Set14 "
                                   "--json out.json`.")
    p.add_argument("--task", required=True, metavar="TASK",
                   help="sr-x2, sr-x3, sr-x4, denoise-15/25/50, derain-light, derain-heavy")
    p.add_argument("--data", required=True, action="append", metavar="DIR",
                   help="a data folder (repeat for several): clean images, or rainy/ + clean/")
    add_model_args(p)
    add_inference_args(p)
    add_device_args(p)
    p.add_argument("--save-dir", metavar="DIR", help="write outputs to DIR/<dataset>/<name>.png")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--per-image", metavar="CSV", help="write per-image PSNR/SSIM as CSV")
    p.add_argument("--max-pixels", type=int, metavar="N", help="refuse images over N pixels before decoding them "
                   "(default: $EDTIR_MAX_PIXELS or 400,000,000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_args(args) -> None:
    from ..models.edt import TASKS

    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; expected one of: {' '.join(TASKS)}")
    check_inference_args(args)
    if args.max_pixels is not None and args.max_pixels <= 0:
        raise UsageError(f"--max-pixels must be a positive number of pixels (got {args.max_pixels})")


def check_outputs(args) -> None:
    """--save-dir, --json and --per-image must be writable before a model is loaded or an image scored."""
    from ..data.io import ensure_writable_dir

    places = [("--save-dir", Path(args.save_dir))] if args.save_dir else []
    for flag, name in (("--json", args.json), ("--per-image", args.per_image)):
        if name:
            if Path(name).is_dir():
                raise UsageError(f"{flag} {name}: is a folder; give a file name")
            places.append((flag, Path(name).parent))
    for flag, folder in places:
        try:
            ensure_writable_dir(folder)
        except EdtirError as e:
            raise EdtirError(f"{flag}: {e}") from None


def finite_or_none(v):
    """JSON has no NaN/inf: a set with no scored image (NaN) or identical images (inf) reads null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def run(args) -> int:
    from ..data.io import atomic_write_bytes
    from ..evaluate import check_folder, evaluate_folder
    from .common import model_from_args

    check_args(args)
    for folder in args.data:  # fail fast, before loading a model or scoring anything
        check_folder(folder, args.task)
    check_outputs(args)
    device = resolve_device(args.device)
    model = model_from_args(args, task=args.task, device=device)
    if args.task not in model.tasks:
        raise UsageError(f"the model does not do task {args.task!r} (it does: {', '.join(model.tasks)})")
    name = args.model or Path(args.weights).name

    results, failures = [], 0
    print(f"{'task':<14}{'dataset':<14}{'images':>7}{'PSNR':>10}{'SSIM':>9}{'seconds':>10}", flush=True)
    for folder in args.data:
        save = Path(args.save_dir) / Path(folder).name if args.save_dir else None
        r = evaluate_folder(model, args.task, folder, tile=args.tile, tile_overlap=args.tile_overlap,
                            tile_batch=args.tile_batch, self_ensemble=args.self_ensemble, device=device,
                            precision=args.precision, save_dir=save, progress=not args.no_progress, name=name,
                            max_pixels=args.max_pixels)
        for msg in r["failed"]:
            print(f"edtir eval: error: {msg}", file=sys.stderr)
        failures += len(r["failed"])
        results.append(r)
        print(f"{r['task']:<14}{r['dataset']:<14}{r['images']:>7}{fmt(r['psnr'], 4):>10}"
              f"{fmt(r['ssim'], 4):>9}{r['seconds']:>10.1f}", flush=True)

    if args.json:
        keys = ("task", "dataset", "model", "psnr", "ssim", "images")
        doc = {"results": [{k: finite_or_none(r[k]) for k in keys} for r in results]}
        text = json.dumps(doc, indent=2) + "\n"
        atomic_write_bytes(args.json, lambda tmp: Path(tmp).write_text(text))
    if args.per_image:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["task", "dataset", "image", "psnr", "ssim", "seconds"])
        for r in results:
            for row in r["rows"]:
                w.writerow([r["task"], r["dataset"], row["name"], f"{row['psnr']:.6f}", f"{row['ssim']:.6f}",
                            f"{row['seconds']:.3f}"])
        atomic_write_bytes(args.per_image, lambda tmp: Path(tmp).write_text(buf.getvalue()))
    if failures:
        print(f"edtir eval: {failures} image(s) failed (reported above)", file=sys.stderr)
        return 1
    return 0
