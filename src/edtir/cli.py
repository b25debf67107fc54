"""The ``edtir`` command: a thin front over the Python API. Each subcommand lives in ``edtir/commands/<name>.py``
and exposes ``register(subparsers)``; the parser it adds sets ``func(args) -> int``.

Exit codes for every command: 0 all went well, 1 some inputs failed (each reported), 2 usage errors. Errors are
one line on stderr, never a traceback (set EDTIR_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import EdtirError

COMMANDS = ("info", "models", "eval", "restore", "export", "train", "demo", "cka", "lam")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    from . import __version__

    p = ArgumentParser(prog="edtir", description="EDT image restoration: models, evaluation, training.")
    p.add_argument("--version", action="version", version=f"edtir {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"commands.{name}"):
                continue  # command not part of this build
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EdtirError as e:
        if os.environ.get("EDTIR_DEBUG"):
            raise
        print(f"edtir {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `edtir ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"edtir {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"edtir {args.command}: error: out of memory (try --tile 256 or a smaller batch)", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. CUDA out of memory, unsupported device
        if os.environ.get("EDTIR_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"edtir {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
