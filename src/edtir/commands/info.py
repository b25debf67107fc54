"""``edtir info``: what a checkpoint or a fresh architecture is (size, tasks, scales, size multiples, parameters,
compute), in the spirit of spandrel's descriptors."""

from __future__ import annotations

import json

from ..errors import UsageError
from .common import parse_tasks


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint, a bundled model or a fresh architecture",
                       description="Describe a checkpoint (edtir .safetensors or official .pth), a bundled model, "
                                   "or with --arch a fresh architecture. Examples: `edtir info SRx2_EDTB.pth`, "
                                   "`edtir info --arch edt-b --tasks sr-x2,sr-x3`, `edtir info --list`.")
    p.add_argument("weights", nargs="?", metavar="WEIGHTS", help="checkpoint file")
    p.add_argument("--model", metavar="NAME", help="a bundled model or baseline")
    p.add_argument("--arch", metavar="SIZE", help="a fresh model: edt-t, edt-s, edt-b, edt-l (edt-bsf: EDT-SF)")
    p.add_argument("--tasks", metavar="T1,T2", help="tasks of the fresh model (default sr-x2)")
    p.add_argument("--window", metavar="HxW", help="horizontal window of the fresh model (default 6x24)")
    p.add_argument("--no-macs", action="store_true", help="skip measuring multiply-accumulates")
    p.add_argument("--list", action="store_true", help="list bundled models and baselines")
    p.add_argument("--system", action="store_true",
                   help="what edtir runs on here: versions, CPU threads, GPUs, and which fast kernels serve")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def parse_window(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--window expects HxW with positive integers, e.g. 6x24 (got {text!r})") from None
    return h, w


def system() -> dict:
    """Versions, devices and the state of the optional kernels: what a bug report or a slow run needs to say."""
    import platform

    import torch

    from .. import __version__
    from ..models import cpu_kernel, kernels

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    if kernels.triton is None:
        triton = "not installed (the CUDA fast path uses PyTorch's kernels)"
    elif not kernels.enabled.on:
        triton = "off (EDTIR_TRITON=0)"
    else:
        triton = f"on (Triton {kernels.triton.__version__})" if gpus else \
            f"Triton {kernels.triton.__version__} installed; serves CUDA inference (no GPU here)"
    return {"edtir": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "cpu_kernels": cpu_kernel.status(), "cuda": gpus, "triton_kernels": triton}


def run(args) -> int:
    from .. import zoo

    if args.system:
        if args.weights or args.model or args.arch or args.list:
            raise UsageError("--system describes this machine: give it alone (or with --json)")
        report = system()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            labels = {"cpu_threads": "CPU threads", "cpu_kernels": "C kernels (CPU fp32)",
                      "cuda": "CUDA GPUs", "triton_kernels": "Triton kernels (GPU inference)"}
            for k, v in report.items():
                v = ", ".join(v) or "none" if isinstance(v, list) else v
                print(f"{labels.get(k, k) + ':':32s} {v}")
        return 0
    if args.list:
        from ..baselines import BASELINES

        for name, entry in zoo.registry().items():
            dflt = entry.get("default_for") or []
            mark = f" [default for {', '.join(dflt)}]" if dflt else ""
            print(f"{name:28s} {entry.get('description', '')}{mark}")
        for name, desc in BASELINES.items():
            print(f"{name:28s} {desc}")
        return 0
    given = [x for x in (args.weights, args.model, args.arch) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of WEIGHTS, --model NAME or --arch SIZE")
    if (args.tasks or args.window) and not args.arch:
        raise UsageError("--tasks and --window describe a fresh model: use them with --arch")
    if args.arch:
        from ..models.edt import EDT, EDTConfig

        try:
            over = {"window_size": parse_window(args.window), "shift_size": None} if args.window else {}
            model = EDT(EDTConfig.preset(args.arch, tasks=parse_tasks(args.tasks) or ["sr-x2"], **over)).eval()
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        model = zoo.get_model(model=args.model, weights=args.weights)
    info = model.info
    macs = {}
    if not args.no_macs and info.params:
        from ..models.profile import macs_per_pixel

        macs = {t: macs_per_pixel(model, t) for t in info.tasks}
    if args.json:
        d = {k: v for k, v in vars(info).items() if k != "config"}
        d["macs_per_pixel"] = macs
        if getattr(model, "load_report", None):
            d["load_report"] = model.load_report.summary()
        print(json.dumps(d, indent=2))
        return 0
    print(info.describe())
    for t, v in macs.items():
        print(f"MACs/pixel   : {t} {v / 1e6:.2f} M (per input pixel, torch.utils.flop_counter)")
    if getattr(model, "load_report", None):
        print(f"loaded       : {model.load_report.summary()}")
    return 0
