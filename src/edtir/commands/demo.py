"""``edtir demo``: the main job on the bundled default model and the bundled sample image, with a comparison
against bicubic so the result means something."""

from __future__ import annotations

import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "kodim23-crop.png"


def register(sub) -> None:
    p = sub.add_parser("demo", help="restore the bundled sample with the bundled default model",
                       description="Super-resolve a bundled crop of Kodak image 23 with the bundled default model "
                                   "and compare with bicubic. Writes PNGs to --output-dir.")
    p.add_argument("--output-dir", default="demo-output", help="where to write the images (default demo-output/)")
    p.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import zoo
    from ..baselines import get_baseline
    from ..data.imresize import imresize
    from ..data.io import read_image, write_image
    from ..evaluate import modcrop
    from ..inference import restore
    from ..metrics import psnr, ssim
    from ..models.edt import build_model
    from .common import resolve_device

    device = resolve_device(args.device)
    out_dir = Path(args.output_dir)
    name = zoo.default_model()
    if name:
        model = zoo.get_model(model=name, device=device)
        label = f"bundled model '{name}' ({zoo.registry()[name].get('description', '')})"
    else:
        torch.manual_seed(0)
        model = build_model("T", ["sr-x2"]).to(device).eval()
        name = "edt-t-untrained"
        label = ("no bundled weights in this build: a freshly initialised EDT-T (random weights) shows the "
                 "pipeline; its output is not meaningful")
    task = next(t for t in model.tasks if t.startswith("sr"))
    s = model.scale(task)
    hr = modcrop(read_image(SAMPLE), s)
    lr = imresize(hr, 1 / s)
    print(f"edtir demo: {label}")
    print(f"sample: {SAMPLE.name} {hr.shape[1]}x{hr.shape[0]}, LR input {lr.shape[1]}x{lr.shape[0]} "
          f"(MATLAB bicubic x1/{s}), task {task}, device {device}")
    rows = []
    for label_, m in (("bicubic", get_baseline("bicubic", task)), (name, model)):
        t0 = time.perf_counter()
        sr = restore(m, lr, task=task, device=device)
        dt = time.perf_counter() - t0
        path = write_image(out_dir / f"kodim23_{task}_{label_}.png", sr)
        rows.append((label_, psnr(sr, hr, s, True), ssim(sr, hr, s, True), dt, path))
    write_image(out_dir / f"kodim23_lr_x{s}.png", lr)
    write_image(out_dir / "kodim23_hr.png", hr)
    print(f"{'method':<24}{'PSNR (Y)':>10}{'SSIM':>8}{'seconds':>9}  output")
    for label_, p, q, dt, path in rows:
        print(f"{label_:<24}{p:>10.2f}{q:>8.4f}{dt:>9.2f}  {path}")
    return 0
