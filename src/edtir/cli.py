"""The ``edtir`` command: a thin front over the Python API. Each subcommand lives in ``edtir/commands/<name>.py``
and exposes ``register(subparsers)``; the parser it adds sets ``func(args) -> int``.

Exit codes for every command: 0 all went well, 1 some inputs failed (each reported) or the work failed, 2 usage
errors (wrong flags, task or model names: the message names the valid choices), 130/143 stopped by SIGINT/SIGTERM
(training saves a checkpoint first). Errors and warnings are one line on stderr each, never a traceback (set
EDTIR_DEBUG=1 to see one). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
import warnings

from .errors import EdtirError, Interrupted

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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    engine = sys.modules.get(f"{__package__}.inference")  # not imported: then no torch allocation failed
    return isinstance(e, MemoryError) or bool(engine and engine.is_out_of_memory(e))


def _reject_unknown(parser: ArgumentParser, args, extra: list[str]) -> None:
    """Unknown arguments: one line naming them, the closest option and the command's options; exit 2."""
    sub = parser
    if getattr(args, "command", None):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    flags = [x.split("=", 1)[0] for x in extra if x.startswith("-")]
    close = [m for f in flags for m in difflib.get_close_matches(f, options, n=1, cutoff=0.6)]
    msg = f"unrecognized argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}"
    if close:
        msg += f" (did you mean {close[0]}?)"
    if flags and options:
        msg += f"; options: {', '.join(options)}"
    sub.error(msg)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _reject_unknown(parser, args, extra)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = f"edtir {args.command}"
    debug = bool(os.environ.get("EDTIR_DEBUG"))

    def say(kind: str, text: str) -> None:
        print(f"{name}: {kind}: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:  # one line per warning, without the source line Python would show
            warnings.showwarning = lambda message, *a, **k: say("warning", str(message))
        try:
            return int(args.func(args) or 0)
        except Interrupted as e:
            say("interrupted", str(e))
            return e.exit_code
        except EdtirError as e:
            if debug:
                raise
            say("error", str(e))
            return e.exit_code
        except BrokenPipeError:  # `edtir ... | head`
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                raise
            if _out_of_memory(e):
                say("error", f"out of memory ({_first_line(e)[:160]}); try --tile 256 or a smaller batch")
            elif isinstance(e, OSError) and e.strerror:  # disk full, permission denied, ...
                say("error", f"{e.filename}: {e.strerror}" if e.filename else e.strerror)
            elif isinstance(e, RuntimeError):  # e.g. an unsupported device
                say("error", _first_line(e))
            else:
                say("error", f"unexpected {type(e).__name__}: {_first_line(e)} (set EDTIR_DEBUG=1 for the "
                             "traceback, and please report it)")
            return 1


if __name__ == "__main__":
    sys.exit(main())
