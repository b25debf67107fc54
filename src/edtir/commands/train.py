"""``edtir train CONFIG.yaml [--output-dir D] [--iterations N] [--resume] [key.path=value ...]``."""

from __future__ import annotations

import argparse
import os

EPILOG = """\
overrides: key.path=value pairs after the config (values are YAML), e.g.
  edtir train configs/cpu-sr-x2.yaml --output-dir runs/x2 train.lr=1e-4 data.sr-x2.subset=50
distributed: torchrun --nproc_per_node=4 -m edtir train CONFIG.yaml (ranks come from the environment)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune an EDT model from a YAML config",
        usage="%(prog)s CONFIG.yaml [--output-dir D] [--iterations N] [--resume] [--no-progress] "
              "[--print-config] [key.path=value ...]",
        description="Train or fine-tune an EDT model: single-task or multi-task pre-training, fine-tuning "
                    "from a checkpoint (init.path), exact resume (--resume), torchrun DDP.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG.yaml", help="training config (see configs/)")
    p.add_argument("--output-dir", "-o", metavar="D", help="where checkpoints, logs and the final model go "
                   "(default: output_dir of the config, else runs/<name>)")
    p.add_argument("--iterations", type=int, metavar="N", help="number of training steps (train.iterations)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in D")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true",
                   help="print the config as it would run (base: merged, overrides applied, defaults filled in, "
                        "checked) and exit without training")
    # nargs='+' made optional: argparse then leaves the overrides for after the options (CONFIG --flags k=v).
    ov = p.add_argument("overrides", nargs="+", default=[], metavar="key.path=value",
                        help="config overrides, e.g. train.lr=1e-4")
    ov.required = False
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.config import dump_config, load_config, with_iterations

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(with_iterations(cfg, args.iterations)), end="")
        return 0
    from ..train.loop import train

    final = train(cfg, args.output_dir, resume=args.resume, iterations=args.iterations,
                  progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, from rank 0
        print(final)
    return 0
