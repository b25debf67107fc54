"""``edtir cka``: layer x layer CKA between two models (or one model and itself) on crops of a data folder, as a
heatmap, a line plot of corresponding layers and JSON (see ``edtir.analysis``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .common import add_device_args, resolve_device


def register(sub) -> None:
    p = sub.add_parser("cka", help="CKA similarity between the layers of two models (heatmap + JSON)",
                       description="Compare the internal representations of two EDT models (or a model with "
                                   "itself) layer by layer with linear minibatch CKA (Nguyen et al. 2021) on "
                                   "random crops of a data folder, made into inputs by the task's evaluation "
                                   "protocol. Layers: head convs, each block's attention and FFN residuals, stage "
                                   "outputs, body, tail. Example: `edtir cka --a edt-t-sr-x2-291 --b "
                                   "runs/x2/model.safetensors --task sr-x2 --data ../shared/data/B100 --out "
                                   "cka.png --json cka.json`.")
    p.add_argument("--a", required=True, metavar="MODEL_OR_WEIGHTS",
                   help="side A: a bundled model name or a checkpoint file")
    p.add_argument("--b", metavar="MODEL_OR_WEIGHTS", help="side B (default: A, i.e. self-similarity)")
    p.add_argument("--task", required=True, metavar="TASK", help="the task both models run (e.g. sr-x2)")
    p.add_argument("--data", required=True, action="append", metavar="DIR",
                   help="images to crop (repeat for several folders; derain: rainy/ + clean/)")
    p.add_argument("--batches", type=int, default=8, metavar="N", help="minibatches (default 8)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="crops per minibatch, >= 4 (default 8)")
    p.add_argument("--crop", type=int, metavar="N",
                   help="input crop side (default: 48 for SR, 96 for down-sampling denoise/derain heads)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crop positions (default 0)")
    p.add_argument("--out", metavar="FIG", help="figure: .png, .pdf or .svg")
    p.add_argument("--json", metavar="FILE", help="write layers and matrix as JSON")
    add_device_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_side(spec: str, task: str, device):
    """A bundled name, a baseline name or an existing checkpoint file."""
    from .. import zoo

    if Path(spec).is_file():
        return zoo.get_model(weights=spec, device=device)
    if Path(spec).suffix in (".pth", ".pt", ".safetensors", ".ckpt"):
        raise UsageError(f"checkpoint {spec} does not exist")
    return zoo.get_model(model=spec, task=task, device=device)


def check_args(args) -> None:
    from ..evaluate import check_folder
    from ..models.edt import TASKS

    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; expected one of: {' '.join(TASKS)}")
    if args.batches < 1:
        raise UsageError(f"--batches must be >= 1 (got {args.batches})")
    if args.batch_size < 4:
        raise UsageError(f"--batch-size must be >= 4, the unbiased HSIC needs 4 samples (got {args.batch_size})")
    if args.crop is not None and args.crop < 1:
        raise UsageError(f"--crop must be a positive number of pixels (got {args.crop})")
    if not args.out and not args.json:
        raise UsageError("nothing to write: give --out FIG and/or --json FILE")
    if args.out:
        from ..analysis.plots import check_out

        check_out(args.out)
    for folder in args.data:
        check_folder(folder, args.task)


def run(args) -> int:
    from ..analysis.compare import batched, compare_models, default_crop, input_crops
    from ..analysis.features import layer_names

    check_args(args)
    device = resolve_device(args.device)
    b_spec = args.b or args.a
    model_a = load_side(args.a, args.task, device)
    model_b = model_a if b_spec == args.a else load_side(b_spec, args.task, device)
    for spec, m in ((args.a, model_a), (b_spec, model_b)):
        if args.task not in m.tasks:
            raise UsageError(f"{spec} does not do task {args.task!r} (it does: {', '.join(m.tasks)})")
        layer_names(m, args.task)  # a baseline has no layers: say so before cropping
    crop = args.crop or default_crop((model_a, model_b), args.task)
    for spec, m in ((args.a, model_a), (b_spec, model_b)):
        mult = m.size_multiple(args.task)
        if crop % mult:
            raise UsageError(f"--crop {crop} is not a multiple of {mult}, the size multiple of {spec} for "
                             f"{args.task}")
    count = args.batches * args.batch_size
    crops = []
    for i, folder in enumerate(args.data):
        share = count // len(args.data) + (i < count % len(args.data))
        crops += input_crops(args.task, folder, share, crop, seed=args.seed + i)
    if len(args.data) > 1:
        import random

        random.Random(args.seed).shuffle(crops)
    batches = batched(crops, args.batch_size)
    result = compare_models(model_a, model_b, args.task, batches, device=device, precision=args.precision,
                            progress=not args.no_progress, total=len(batches))
    result.meta.update({"a": args.a, "b": b_spec, "crop": crop, "data": args.data, "seed": args.seed})
    diag = [v for _, v in result.corresponding() if v == v]  # NaN (a constant layer) left out
    print(f"{len(result.layers_a)} x {len(result.layers_b)} layers, {result.samples} crops of {crop}x{crop} in "
          f"{result.batches} batches; mean CKA of corresponding layers {sum(diag) / max(1, len(diag)):.4f}")
    if args.json:
        from ..analysis.plots import save_json

        save_json(result.to_json(), args.json)
        print(f"wrote {args.json}")
    if args.out:
        from ..analysis.plots import cka_figure

        title = f"CKA {args.task}: {Path(args.a).name}" + ("" if b_spec == args.a else f" vs {Path(b_spec).name}")
        cka_figure(result, args.out, title=title, label_a=Path(args.a).name, label_b=Path(b_spec).name)
        print(f"wrote {args.out}")
    return 0
