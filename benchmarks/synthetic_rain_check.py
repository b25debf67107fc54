"""Does a derain model remove the rain it was trained on? PSNR (Y) of our own synthetic rain over Kodak24 crops,
before and after the model: tells an under-trained head (no gain here either) from a gap between our synthetic
rain and Rain100L/H (a gain here, none there).

    python benchmarks/synthetic_rain_check.py [--model edt-t-multi-291 | --weights FILE] [--images 6] [--crop 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import edtir
from edtir import zoo
from edtir.data.degrade import add_rain
from edtir.data.io import list_images, read_image
from edtir.errors import run_script
from edtir.metrics import psnr, rgb_to_y

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Kodak24"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="edt-t-multi-291")
    ap.add_argument("--weights", help="a checkpoint instead of a bundled model")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--crop", type=int, default=256)
    args = ap.parse_args()
    model = zoo.get_model(args.model, weights=args.weights)
    name = args.weights or args.model
    files = list_images(DATA)[: args.images]
    print(f"# {name}; synthetic rain (seed = image index) over {len(files)} Kodak24 crops of "
          f"{args.crop}x{args.crop}; PSNR on Y, dB")
    print(f"{'task':<14}{'rainy input':>12}{'model':>10}")
    for kind in ("light", "heavy"):
        task = f"derain-{kind}"
        if task not in model.tasks:
            continue
        before, after = [], []
        for i, f in enumerate(files):
            clean = read_image(f)[: args.crop, : args.crop]
            rainy = add_rain(clean, np.random.default_rng(i), kind)
            out = edtir.restore(model, rainy, task=task)
            before.append(psnr(rgb_to_y(rainy), rgb_to_y(clean)))
            after.append(psnr(rgb_to_y(out), rgb_to_y(clean)))
        print(f"{task:<14}{np.mean(before):>12.2f}{np.mean(after):>10.2f}")
    return 0


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
