"""How heavy is each synthetic rain preset? PSNR (Y) of the rainy image against the clean one, over training images
(never a test image), three draws per image: the figure the ``*-wide`` presets were sized by, so that they are
as heavy as the preset they widen, only of more kinds.

    python benchmarks/rain_levels.py [--data ../shared/data/T91] [--every 9] [--images 10] [--draws 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edtir.data.degrade import RAIN_PRESETS, add_rain
from edtir.data.io import list_images, read_image
from edtir.errors import run_script
from edtir.metrics import psnr, rgb_to_y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "T91"))
    ap.add_argument("--every", type=int, default=9, help="take every N-th image of the folder")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--draws", type=int, default=3, help="rain draws per image")
    args = ap.parse_args()
    for flag in ("every", "images", "draws"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    images = [read_image(f) for f in list_images(args.data)[:: args.every][: args.images]]
    if not images:
        ap.error(f"--data {args.data}: no images found")
    print(f"# rainy-input PSNR (Y, dB) over {len(images)} images of {args.data} x {args.draws} draws "
          f"(seed = draw index)")
    print(f"{'preset':<12}{'p10':>7}{'median':>8}{'p90':>7}{'mean':>7}")
    for level in RAIN_PRESETS:
        scores = [psnr(rgb_to_y(add_rain(c, np.random.default_rng(s), level)), rgb_to_y(c))
                  for s, c in enumerate(images * args.draws)]
        p10, p50, p90 = np.percentile(scores, [10, 50, 90])
        print(f"{level:<12}{p10:7.1f}{p50:8.1f}{p90:7.1f}{np.mean(scores):7.2f}")
    return 0


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
