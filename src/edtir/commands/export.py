"""``edtir export``: a checkpoint (or a bundled model) as ONNX with dynamic height and width, checked against
PyTorch with onnxruntime when it is installed."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (dynamic height/width)",
                       description="Export one task of a checkpoint or bundled model to ONNX: input 'input' "
                                   "(N, 3, H, W) float32 in [0, 1], H and W any multiples of the task's size "
                                   "multiple (see `edtir info`); output 'output' (N, 3, sH, sW). Needs the onnx "
                                   "extra: pip install 'edtir[onnx]'. Example: `edtir export "
                                   "edt-t-sr-x2-291 -o edt-x2.onnx` or `edtir export EDT_x4.pth --task sr-x4 "
                                   "-o x4.onnx --opset 18`.")
    p.add_argument("weights", metavar="WEIGHTS", help="a checkpoint file (.safetensors/.pth) or a bundled model name")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format (onnx)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--task", help="the task to export (needed when the model has several)")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's, 18 or later)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-check", action="store_true",
                   help="skip the parity check against PyTorch (run when onnxruntime is installed)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from .. import zoo
    from ..data.io import read_image
    from ..export import export_onnx, parity
    from ..models.checkpoint import load_model
    from .demo import SAMPLE

    out = Path(args.output)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"-o {out}: the output should end in .onnx")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out}: exists (use --overwrite to replace it)")
    if args.opset is not None and not 7 <= args.opset <= 30:
        raise UsageError(f"--opset {args.opset}: expected an ONNX opset number such as 17 or 18")
    if args.weights in zoo.registry():
        model = zoo.get_model(args.weights)
    elif Path(args.weights).suffix or Path(args.weights).exists():
        model = load_model(args.weights)
    else:
        raise UsageError(f"{args.weights}: neither a file nor a bundled model (bundled: "
                         f"{', '.join(zoo.registry()) or 'none'})")
    t0 = time.perf_counter()
    path = export_onnx(model, out, task=args.task, opset=args.opset)
    task = args.task or model.tasks[0]
    m, s = model.size_multiple(task), model.scale(task)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s: task {task}, "
          f"input (N, 3, H, W) with H, W multiples of {m}, output x{s}")
    if args.no_check:
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("parity check skipped (onnxruntime is not installed)")
        return 0
    image = read_image(SAMPLE)
    sizes = [(h * m, w * m) for h, w in ((2, 3), (3, 2), (1, 2), (2, 1), (1, 1))
             if h * m <= image.shape[0] and w * m <= image.shape[1]][:2]
    for h, w in sizes:  # two sizes: one file serves both
        diff = parity(model, path, image[:h, :w], task=task)
        print(f"parity with PyTorch on a {w}x{h} crop of {SAMPLE.name}: max abs diff {diff:.2e}")
    return 0
