"""Can a derain head fit a handful of fixed training pairs? Fine-tunes a bundled model on 4 BSD200 crops (none of
the 67 behind Rain100L/H) with our own synthetic rain and prints PSNR (Y) on those same pairs as it goes: a head
that cannot even overfit them has an optimisation problem, not a data-gap one. ``--loss`` picks the pixel loss: with
L1 the light head stays at its rainy input, with L2 it fits (the reason ``train.losses`` exists).

    python benchmarks/derain_overfit.py --level light --steps 150     # about 7 minutes on 2 CPU cores
    python benchmarks/derain_overfit.py --level heavy --steps 100
    python benchmarks/derain_overfit.py --level light --steps 100 --crop 96 --loss l2    # 1.5 minutes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from edtir import zoo
from edtir.data.datasets import to_tensor
from edtir.data.degrade import add_rain
from edtir.data.io import list_images, read_image, tensor_to_uint8
from edtir.errors import run_script
from edtir.metrics import psnr
from edtir.train.config import LOSSES
from edtir.train.loop import pixel_loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR on Y over a batch, each image rounded to uint8 first (the field's convention)."""
    return float(np.mean([psnr(tensor_to_uint8(u), tensor_to_uint8(v), y_channel=True)
                          for u, v in zip(a, b, strict=True)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="edt-t-multi-291")
    ap.add_argument("--level", choices=("light", "heavy"), default="light")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss", choices=LOSSES, default="l1",
                    help="pixel loss: l1 (the trainer's default) or l2 (mean squared error)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = f"derain-{args.level}"
    model = zoo.get_model(args.model).train()
    overlap = set((DATA / "rain100-overlap-BSD200.txt").read_text().split())
    files = [f for f in list_images(DATA / "BSD200") if f.stem not in overlap and f.name not in overlap][:4]
    clean = [read_image(f)[: args.crop, : args.crop] for f in files]
    x = torch.stack([to_tensor(add_rain(c, np.random.default_rng(i), args.level)) for i, c in enumerate(clean)])
    y = torch.stack([to_tensor(c) for c in clean])

    def score() -> float:
        model.eval()
        with torch.no_grad():
            out = model(x, task=task)
        model.train()
        return mean_psnr(out, y)

    print(f"# {args.model}, {task}: {len(files)} BSD200 crops of {args.crop} ({', '.join(f.stem for f in files)}), "
          f"Adam lr {args.lr}, {args.loss.upper()} loss; PSNR on Y over the same pairs")
    print(f"{'step':>6}{args.loss.upper():>9}{'model':>9}{'rainy':>9}{'seconds':>9}")
    rainy = mean_psnr(x, y)
    print(f"{0:>6}{'':>9}{score():>9.2f}{rainy:>9.2f}{0:>9.0f}", flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = pixel_loss(args.loss, model(x, task=task), y)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            print(f"{step:>6}{loss.item():>9.4f}{score():>9.2f}{rainy:>9.2f}{time.time() - t0:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
