"""``edtir restore``: the practitioner's command. Restore image files or folders with the task's default bundled
model, another bundled model, a baseline or a checkpoint. Grey, alpha and 16 bits are kept; outputs are
``OUTDIR/<stem>_<task>.png``, written atomically, never over an input or (without --overwrite) an existing file.
One bad input is reported and skipped; the exit code is then 1."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import EdtirError, ImageError, UsageError
from .common import (
    add_device_args,
    add_inference_args,
    add_model_args,
    check_inference_args,
    model_from_args,
    resolve_device,
)


def register(sub) -> None:
    p = sub.add_parser("restore", help="restore your own images (super-resolve, denoise, derain)",
                       description="Restore image files (PNG, JPEG, TIFF, WebP, BMP) or every image in a folder. "
                                   "Without --model/--weights the task's default bundled model runs. Outputs "
                                   "are OUTDIR/<stem>_<task>.png; grey stays grey, alpha is kept (bicubic-resized "
                                   "for SR), 16-bit PNGs stay 16-bit. Examples: `edtir restore photo.jpg --task "
                                   "sr-x2 -o out/`, `edtir restore photos/ --task denoise-25 -o clean/ --tile "
                                   "256`, `edtir restore photos/ --weights EDT_x4.pth -o restored/`.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--task", help="sr-x2, sr-x3, sr-x4, denoise-15/25/50, derain-light, derain-heavy (needed "
                                  "unless the model has a single task)")
    add_model_args(p)
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="output folder, created if missing (default: restored/); a file name for a single input")
    p.add_argument("--suffix", default=None, help="added to output names (default: _<task>)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse inputs over N pixels before decoding them (default: $EDTIR_MAX_PIXELS or "
                        "400,000,000)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (for logs and scripts; the per-image lines stay)")
    add_inference_args(p)
    add_device_args(p)
    p.set_defaults(func=run)


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(files to restore, error messages): a folder gives its images (by extension); a file is taken whatever
    its extension (its content decides); a missing path or an unreadable folder is an error, not fatal."""
    from ..data.io import list_images

    files, errors = [], []
    for name in inputs:
        path = Path(name)
        try:
            if path.is_dir():
                found = list_images(path)
                if not found:
                    errors.append(f"{path}: no images in this folder")
                files += found
            elif path.exists():
                files.append(path)
            else:
                errors.append(f"{path}: no such file or folder")
        except (OSError, ImageError) as e:
            errors.append(f"{path}: cannot read this folder ({getattr(e, 'strerror', None) or e})")
    return files, errors


def output_target(files: list[Path], output: str | None) -> tuple[Path, bool]:
    """(output folder, or output file for a single input; True when it is a file)."""
    from ..data.io import is_image_file

    if output and is_image_file(output) and not Path(output).is_dir():
        if len(files) > 1:
            raise UsageError(f"-o {output}: several inputs need an output folder, not a file name")
        return Path(output), True
    return Path(output or "restored"), False


def output_paths(files: list[Path], target: Path, is_file: bool, suffix: str) -> list[Path]:
    if is_file:
        return [target]
    outs = [target / f"{f.stem}{suffix}.png" for f in files]
    seen: dict[Path, Path] = {}
    for f, o in zip(files, outs, strict=True):
        if o in seen:
            raise UsageError(f"{seen[o]} and {f} would both write {o}; restore them into separate folders")
        seen[o] = f
    return outs


def run(args) -> int:
    from tqdm import tqdm

    from ..data.io import ensure_writable_dir, max_pixels, read_picture, write_picture
    from ..inference import resolve_task
    from ..pipeline import restore_picture

    check_inference_args(args)
    try:
        limit = max_pixels(args.max_pixels)
    except ImageError as e:
        raise UsageError(f"--max-pixels: {e}") from None
    if args.weights is None and args.model in (None, "default"):  # name the model before any work
        from .. import zoo

        if args.task is None:
            have = ", ".join(zoo.defaults()) or "none yet"
            raise UsageError(f"give --task to use its default bundled model (tasks with one: {have}), or "
                             "--model NAME / --weights FILE")
        args.model = zoo.default_for(args.task)
    files, errors = collect_inputs(args.inputs)
    for msg in errors:
        print(f"edtir restore: error: {msg}", file=sys.stderr, flush=True)
    if not files:
        raise ImageError("nothing to restore (no readable input)")
    target, is_file = output_target(files, args.output)
    ensure_writable_dir(target.parent if is_file else target)  # before any work
    device = resolve_device(args.device)
    model = model_from_args(args, task=args.task, device=device)
    try:
        task = resolve_task(model, args.task)
    except ValueError as e:
        raise UsageError(f"{e} (--task)") from None
    suffix = f"_{task}" if args.suffix is None else args.suffix
    outs = output_paths(files, target, is_file, suffix)
    inputs = {f.resolve() for f in files}
    failed = len(errors)
    print(f"edtir restore: {len(files)} image(s), task {task}, model {args.model or args.weights}, "
          f"device {device}", flush=True)
    tile_bar = args.tile is not None and len(files) == 1 and not args.no_progress  # a bar over one image's tiles
    bar = tqdm(list(zip(files, outs, strict=True)), unit="image", disable=len(files) < 2 or args.no_progress,
                dynamic_ncols=True)
    for src, dst in bar:
        try:
            if dst.resolve() in inputs:
                raise ImageError(f"{dst}: is one of the inputs (refusing to overwrite it)")
            if dst.exists() and not args.overwrite:
                raise ImageError(f"{dst}: exists (use --overwrite to replace it)")
            pic = read_picture(src, limit=limit)
            out = restore_picture(model, pic, task=task, tile=args.tile, tile_overlap=args.tile_overlap,
                                  tile_batch=args.tile_batch, self_ensemble=args.self_ensemble, device=device,
                                  precision=args.precision, progress=tile_bar)
            write_picture(dst, out, overwrite=args.overwrite)
            h, w = pic.rgb.shape[:2]
            H, W = out.rgb.shape[:2]
            tqdm.write(f"{src} -> {dst} ({w}x{h} -> {W}x{H}, {pic.mode}, {pic.bits}-bit)")
        except EdtirError as e:
            failed += 1
            tqdm.write(f"edtir restore: error: {e}", file=sys.stderr)
        except (MemoryError, RuntimeError) as e:  # one huge image must not end the batch
            if not isinstance(e, MemoryError) and "out of memory" not in str(e):
                raise
            failed += 1
            tqdm.write(f"edtir restore: error: {src}: out of memory (try --tile 256, or a smaller --tile)",
                       file=sys.stderr)
    if failed:
        total = len(files) + len(errors)
        written = f"the other {total - failed} written" if failed < total else "nothing written"
        print(f"edtir restore: {failed} of {total} input(s) failed (reported above); {written}", file=sys.stderr)
    return 1 if failed else 0
