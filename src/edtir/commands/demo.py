"""``edtir demo``: the main job on the bundled sample image with the default bundled models, SR x4 and denoising
(sigma 25), each beside the trivial answer (bicubic, the noisy input) and the original, with PSNR against it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "kodim23-crop.png"
SR_TASK, DN_TASK, SEED = "sr-x4", "denoise-25", 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="restore the bundled sample with the default bundled models",
                       description="Super-resolve (x4, from a MATLAB-bicubic downscale) and denoise (sigma 25, "
                                   "seeded noise) a bundled 240x240 crop of Kodak image 23 with the default "
                                   "bundled models; print PSNR against the original and write the images and a "
                                   "labelled side-by-side comparison.png to --output-dir. A task without a bundled "
                                   "model is skipped with a note (SR falls back to another bundled scale).")
    p.add_argument("--output-dir", default="demo-output", help="where to write the images (default demo-output/)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=run)


def pick(tasks: tuple[str, ...]) -> str | None:
    """The first task of ``tasks`` that has a default bundled model."""
    from .. import zoo

    have = zoo.defaults()
    return next((t for t in tasks if t in have), None)


def sr_part(sample: np.ndarray, get, device) -> dict | None:
    from ..data.degrade import modcrop
    from ..data.imresize import imresize
    from ..inference import restore
    from ..metrics import psnr

    task = pick((SR_TASK, "sr-x3", "sr-x2"))
    if task is None:
        print(f"super-resolution: skipped (no bundled model does {SR_TASK} or another SR scale yet)")
        return None
    if task != SR_TASK:
        print(f"super-resolution: no bundled model does {SR_TASK} yet; showing {task} instead")
    name, model = get(task)
    s = model.scale(task)
    hr = modcrop(sample, s)
    lr = imresize(hr, 1 / s)
    bicubic = imresize(lr, s)
    t0 = time.perf_counter()
    ours = restore(model, lr, task=task, device=device)
    dt = time.perf_counter() - t0
    shown_lr = np.repeat(np.repeat(lr, s, axis=0), s, axis=1)  # nearest: what the model was given
    return {"task": task, "name": name, "seconds": dt, "metric": f"PSNR on Y, border {s}",
            "panels": [(f"input (x1/{s})", shown_lr, None), ("bicubic", bicubic, psnr(bicubic, hr, s, True)),
                       (name, ours, psnr(ours, hr, s, True)), ("original", hr, None)],
            "files": {f"lr_x{s}": lr, f"{task}_bicubic": bicubic, f"{task}_{name}": ours}}


def dn_part(sample: np.ndarray, get, device) -> dict | None:
    from ..evaluate import add_noise
    from ..inference import restore
    from ..metrics import psnr

    if pick((DN_TASK,)) is None:
        print(f"denoising: skipped (no bundled model does {DN_TASK} yet)")
        return None
    name, model = get(DN_TASK)
    sigma = int(DN_TASK.split("-")[1])
    noisy = add_noise(sample, sigma, np.random.RandomState(SEED))  # float, unclipped: the eval protocol
    shown = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    t0 = time.perf_counter()
    ours = restore(model, (noisy / 255.0).astype(np.float32), task=DN_TASK, device=device)
    dt = time.perf_counter() - t0
    ours = np.clip(np.round(ours * 255.0), 0, 255).astype(np.uint8)
    return {"task": DN_TASK, "name": name, "seconds": dt, "metric": "PSNR on RGB",
            "panels": [(f"noisy (sigma {sigma})", shown, psnr(shown, sample)), (name, ours, psnr(ours, sample)),
                       ("original", sample, None)],
            "files": {f"noisy_{sigma}": shown, f"{DN_TASK}_{name}": ours}}


def comparison(parts: list[dict]) -> np.ndarray:
    """One row per part: labelled panels side by side (label strip above each panel)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    rows = []
    for part in parts:
        panels = []
        for label, img, p in part["panels"]:
            text = label + (f"  {p:.2f} dB" if p is not None else "")
            strip = Image.new("RGB", (img.shape[1], 20), "white")
            ImageDraw.Draw(strip).text((4, 3), text, fill="black", font=font)
            panels.append(np.concatenate([np.asarray(strip), img], axis=0))
        h = max(p.shape[0] for p in panels)
        gap = np.full((h, 6, 3), 255, np.uint8)
        row = [x for p in panels for x in (np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)),
                                                   constant_values=255), gap)][:-1]
        rows.append(np.concatenate(row, axis=1))
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 8), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def run(args) -> int:
    from .. import zoo
    from ..data.io import read_image, write_image
    from .common import resolve_device

    device = resolve_device(args.device)
    out_dir = Path(args.output_dir)
    sample = read_image(SAMPLE)
    print(f"edtir demo: {SAMPLE.name} ({sample.shape[1]}x{sample.shape[0]}), device {device}")
    loaded: dict[str, object] = {}

    def get(task):
        name = zoo.default_for(task)
        if name not in loaded:
            loaded[name] = zoo.get_model(name, device=device)
        return name, loaded[name]

    parts = [p for p in (sr_part(sample, get, device), dn_part(sample, get, device)) if p]
    if not parts:
        print("edtir demo: no bundled model for super-resolution or denoising in this build; nothing to show")
        return 1
    for part in parts:
        print(f"\n{part['task']} with '{part['name']}' ({part['metric']}, against the original):")
        for label, _, value in part["panels"]:
            if value is not None:
                print(f"  {label:<24}{value:8.2f} dB")
        print(f"  restored in {part['seconds']:.1f} s")
        for key, img in part["files"].items():
            write_image(out_dir / f"kodim23_{key}.png", img)
    write_image(out_dir / "kodim23_original.png", sample)
    path = write_image(out_dir / "comparison.png", comparison(parts))
    print(f"\nwrote {len(list(out_dir.glob('kodim23_*.png')))} images and {path} "
          "(each row: input | bicubic or noisy | ours | original)")
    return 0
