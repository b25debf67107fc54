"""``edtir lam``: Local Attribution Map of one output window (which input pixels the model used), its diffusion
index, a figure and JSON (see ``edtir.analysis.lam``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .common import add_device_args, add_model_args, model_from_args, resolve_device


def register(sub) -> None:
    p = sub.add_parser("lam", help="Local Attribution Map and diffusion index of an output window",
                       description="Local Attribution Map (Gu & Dong, CVPR 2021): path-integrated gradients "
                                   "along a progressive-blur path (sigma 1.2, 50 steps) of the texture of one "
                                   "output window, shown over the input, with the diffusion index DI = (1 - "
                                   "Gini) x 100 (higher: the model draws on more pixels). Works with any model, "
                                   "baselines included. Example: `edtir lam --model edt-t-sr-x2-291 --task "
                                   "sr-x2 --image hr.png --degrade --crop 0,0,128,128 --window 40,40,16 --out "
                                   "lam.png --json lam.json`.")
    add_model_args(p)
    p.add_argument("--task", metavar="TASK", help="the task (needed unless the model has a single task)")
    p.add_argument("--image", required=True, metavar="FILE",
                   help="the model's input (LR image for SR), or with --degrade a clean image")
    p.add_argument("--degrade", action="store_true",
                   help="treat --image as clean and make the input: bicubic LR (SR), seeded noise (denoise), "
                        "seeded synthetic rain (derain)")
    p.add_argument("--crop", metavar="X,Y,W,H", help="use this crop of --image (before --degrade); LAM runs the "
                                                     "model 50 times with gradients, so keep inputs small")
    p.add_argument("--window", required=True, metavar="X,Y,SIZE",
                   help="output window to explain: top-left column X, row Y, side SIZE, in output pixels")
    p.add_argument("--sigma", type=float, default=1.2, help="blur of the path's start (default 1.2, as LAM)")
    p.add_argument("--steps", type=int, default=50, help="path steps (default 50, as LAM)")
    p.add_argument("--batch", type=int, default=4, metavar="N", help="path steps per forward pass (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise or rain of --degrade (default 0)")
    p.add_argument("--out", metavar="FIG", help="figure: .png, .pdf or .svg")
    p.add_argument("--json", metavar="FILE", help="write DI, Gini and the window as JSON")
    p.add_argument("--save-map", metavar="NPY", help="write the normalised attribution map (H x W) as .npy")
    add_device_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_ints(text: str, n: int, flag: str, example: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
        if len(vals) != n:
            raise ValueError
    except ValueError:
        raise UsageError(f"{flag} expects {n} integers separated by commas, e.g. {example} (got {text!r})") from None
    return vals


def check_args(args) -> None:
    from ..models.edt import TASKS

    if args.task is not None and args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; expected one of: {' '.join(TASKS)}")
    if args.steps < 1 or args.batch < 1:
        raise UsageError("--steps and --batch must be >= 1")
    if not args.sigma > 0:
        raise UsageError(f"--sigma must be > 0 (got {args.sigma})")
    if not (args.out or args.json or args.save_map):
        raise UsageError("nothing to write: give --out FIG, --json FILE and/or --save-map NPY")
    if args.out:
        from ..analysis.plots import check_out

        check_out(args.out)


def load_input(args, task: str):
    """(model input HWC float32, the image shown under the map) from --image, --crop and --degrade."""
    import numpy as np

    from ..analysis.lam import degraded_input
    from ..data.io import read_image

    image = read_image(args.image)
    if args.crop:
        x, y, w, h = parse_ints(args.crop, 4, "--crop", "0,0,128,128")
        H, W = image.shape[:2]
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > W or y + h > H:
            raise UsageError(f"--crop {args.crop} does not fit in the {W}x{H} image {args.image}")
        image = image[y:y + h, x:x + w]
    if args.degrade:
        return degraded_input(image, task, args.seed)
    return image.astype(np.float32) / 255.0


def run(args) -> int:
    import numpy as np
    import torch

    from ..analysis.lam import lam
    from ..analysis.plots import lam_figure, save_json
    from ..data.io import atomic_write_bytes
    from ..inference import resolve_task

    check_args(args)
    window = parse_ints(args.window, 3, "--window", "40,40,16")
    device = resolve_device(args.device)
    model = model_from_args(args, task=args.task, device=device)
    try:
        task = resolve_task(model, args.task)
    except ValueError as e:
        raise UsageError(str(e)) from None
    inp = load_input(args, task)
    x = torch.from_numpy(np.ascontiguousarray(inp.transpose(2, 0, 1)))[None]
    r = lam(model, x, window, task, sigma=args.sigma, steps=args.steps, batch=args.batch, device=device,
            precision=args.precision, progress=not args.no_progress)
    name = args.model or Path(args.weights).name
    print(f"{name} {task} window {args.window}: DI {r.di:.3f} (Gini {r.gini:.4f}), input "
          f"{x.shape[-1]}x{x.shape[-2]}, {args.steps} steps")
    if args.json:
        save_json({"model": name, "task": task, "image": str(args.image), "crop": args.crop,
                   "degrade": args.degrade, **r.to_json()}, args.json)
        print(f"wrote {args.json}")
    if args.save_map:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, r.attribution.astype(np.float32))

        atomic_write_bytes(args.save_map, write)
        print(f"wrote {args.save_map}")
    if args.out:
        lam_figure(r, inp, args.out, title=f"{name}, {task}")
        print(f"wrote {args.out}")
    return 0
