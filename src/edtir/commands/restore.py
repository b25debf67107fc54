"""``edtir restore``: the practitioner's command. Restore image files or folders with a bundled model, a baseline
or a checkpoint; outputs are written atomically and never over an input or (without --overwrite) an existing file."""

from __future__ import annotations

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
                       description="Restore image files (or every image in a folder). Examples: "
                                   "`edtir restore photo.png --model bicubic --task sr-x2 -o photo_x2.png`, "
                                   "`edtir restore photos/ --weights EDT_x4.pth -o restored/ --tile 256`.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    add_model_args(p)
    p.add_argument("--task", help="task to run (needed when the model has several)")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="output folder (default: restored/), or a file name for a single input")
    p.add_argument("--suffix", default=None, help="added to output names (default: _<task>)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_inference_args(p)
    add_device_args(p)
    p.set_defaults(func=run)


def collect_inputs(inputs: list[str]) -> list[Path]:
    from ..data.io import is_image_file, list_images

    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise ImageError(f"{path}: no images in this folder")
            files += found
        elif path.exists():
            if not is_image_file(path):
                raise ImageError(f"{path}: not an image file (by its extension)")
            files.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    return files


def output_paths(files: list[Path], output: str | None, suffix: str) -> list[Path]:
    from ..data.io import is_image_file

    if output and len(files) == 1 and is_image_file(output) and not Path(output).is_dir():
        return [Path(output)]
    if output and is_image_file(output) and len(files) > 1:
        raise UsageError(f"-o {output}: several inputs need an output folder, not a file name")
    folder = Path(output or "restored")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"-o {folder}: exists and is not a folder")
    outs = [folder / f"{f.stem}{suffix}.png" for f in files]
    if len(set(outs)) != len(outs):
        raise UsageError("two inputs would write the same output name; restore them into separate folders")
    return outs


def run(args) -> int:
    from tqdm import tqdm

    from ..data.io import read_image, write_image
    from ..inference import resolve_task, restore

    check_inference_args(args)
    files = collect_inputs(args.inputs)
    device = resolve_device(args.device)
    model = model_from_args(args, task=args.task, device=device)
    try:
        task = resolve_task(model, args.task)
    except ValueError as e:
        raise UsageError(f"{e} (--task)") from None
    suffix = f"_{task}" if args.suffix is None else args.suffix
    outs = output_paths(files, args.output, suffix)
    inputs = {f.resolve() for f in files}
    failed = 0
    bar = tqdm(list(zip(files, outs, strict=True)), unit="image", disable=len(files) < 2)
    for src, dst in bar:
        try:
            if dst.resolve() in inputs:
                raise ImageError(f"{dst}: is one of the inputs (refusing to overwrite it)")
            if dst.exists() and not args.overwrite:
                raise ImageError(f"{dst}: exists (use --overwrite to replace it)")
            image = read_image(src)
            out = restore(model, image, task=task, tile=args.tile, tile_overlap=args.tile_overlap,
                          tile_batch=args.tile_batch, self_ensemble=args.self_ensemble, device=device,
                          precision=args.precision,
                          progress=args.tile is not None and len(files) == 1)
            write_image(dst, out)
            tqdm.write(f"{src} -> {dst} ({image.shape[1]}x{image.shape[0]} -> {out.shape[1]}x{out.shape[0]})")
        except EdtirError as e:
            failed += 1
            tqdm.write(f"edtir restore: error: {e}")
    if failed:
        print(f"edtir restore: {failed} of {len(files)} image(s) failed")
    return 1 if failed else 0
