"""Make docs/img/rain-samples.png: the synthetic rain model of ``edtir.data.degrade`` on T91 training images
(never a test image): clean | light | light-wide (two draws) | heavy | heavy-wide | heavy streak layers alone,
one row per image.

    python docs/make_rain_figure.py [--data ../shared/data/T91] [--out docs/img/rain-samples.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edtir.data import degrade
from edtir.data.io import read_image

PANEL = 160


def panel(image: np.ndarray, label: str) -> Image.Image:
    im = Image.fromarray(image)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 7 * len(label) + 6, 13], fill=(0, 0, 0))
    d.text((3, 1), label, fill=(255, 255, 255))
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/T91", help="a folder of training images")
    ap.add_argument("--images", default="tt2.png,tt25.png", help="comma-separated file names in --data")
    ap.add_argument("--out", default="docs/img/rain-samples.png")
    args = ap.parse_args()
    rows = []
    for i, name in enumerate(args.images.split(",")):
        img = read_image(Path(args.data) / name)
        y, x = (img.shape[0] - PANEL) // 2, (img.shape[1] - PANEL) // 2
        clean = img[y:y + PANEL, x:x + PANEL]
        light = degrade.add_rain(clean, np.random.default_rng([i, 0]), "light")
        wide = [degrade.add_rain(clean, np.random.default_rng([i, 2, k]), "light-wide") for k in range(2)]
        heavy = degrade.add_rain(clean, np.random.default_rng([i, 1]), "heavy")
        heavy_wide = degrade.add_rain(clean, np.random.default_rng([i, 3]), "heavy-wide")
        streaks, _, _ = degrade.rain_streaks(clean.shape[:2], np.random.default_rng([i, 1]), "heavy")
        layer = np.repeat((streaks[..., None] * 255).round().astype(np.uint8), 3, axis=2)
        rows.append([panel(clean, f"clean {name}"), panel(light, "light"), panel(wide[0], "light-wide"),
                     panel(wide[1], "light-wide"), panel(heavy, "heavy"), panel(heavy_wide, "heavy-wide"),
                     panel(layer, "heavy: streaks only")])
    cols = len(rows[0])
    fig = Image.new("RGB", (cols * PANEL + (cols - 1) * 4, len(rows) * PANEL + (len(rows) - 1) * 4), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            fig.paste(im, (c * (PANEL + 4), r * (PANEL + 4)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out, optimize=True)
    print(f"{out}: {fig.size[0]}x{fig.size[1]}, {out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
