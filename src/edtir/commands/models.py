"""``edtir models``: the bundled models (size, tasks, the tasks each is the default for, scores per test set) and
the baselines; one model's full registry entry (recipe, data, steps, how the scores were measured) by name."""

from __future__ import annotations

import json

from ..errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("models", help="list the bundled models and their scores",
                       description="List the bundled models: size, tasks, default-for, PSNR/SSIM on each test "
                                   "set (measured with `edtir eval`), and the weightless baselines. With a NAME, "
                                   "show that model's whole registry entry (training recipe, data, steps).")
    p.add_argument("name", nargs="?", help="show one model in full")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _mb(entry: dict, folder) -> str:
    f = folder / entry["file"]
    return f"{f.stat().st_size / 1e6:.1f} MB" if f.exists() else "missing"


def _scores(entry: dict) -> list[str]:
    lines = []
    for task, sets in entry.get("scores", {}).items():
        cells = [f"{name} {s['psnr']:.2f}/{s['ssim']:.4f}" for name, s in sets.items()]
        lines.append(f"    {task:<13}" + "   ".join(cells))
    return lines or ["    (no scores measured)"]


def show_retired(name: str, e: dict, as_json: bool) -> int:
    """A retired model: its record and the command that restores its file from the repository's history."""
    from .. import zoo

    if as_json:
        print(json.dumps(e, indent=2))
        return 0
    r = e["retired"]
    print(f"{name}: {e.get('description', '')}")
    print(f"  retired         : {r.get('date', '?')}, superseded by {r['replaced_by']}; no longer shipped")
    print(f"  restore its file: {zoo.restore_command(e)}   (in the repository; then --weights {r['path']})")
    for k, v in (("tasks", ", ".join(e.get("tasks", []))), ("steps", f"{e.get('steps', 0):,}"),
                 ("config", e.get("recipe", {}).get("config", ""))):
        print(f"  {k:<16}: {v}")
    print("  scores when it shipped (PSNR dB / SSIM):")
    print("\n".join(_scores(e)))
    return 0


def run(args) -> int:
    from .. import zoo
    from ..baselines import BASELINES
    from ..models.edt import TASKS

    folder = zoo.zoo_dir()
    reg = zoo.registry()
    defaults = zoo.defaults()
    gone = zoo.retired()
    if args.name in gone:
        return show_retired(args.name, gone[args.name], args.json)
    if args.name is not None and args.name not in reg:
        raise UsageError(f"unknown bundled model {args.name!r}; bundled: {', '.join(reg) or 'none'}")
    if args.json:
        models = {n: {**e, "file_bytes": (folder / e["file"]).stat().st_size if (folder / e["file"]).exists()
                      else None} for n, e in reg.items() if args.name in (None, n)}
        doc = models[args.name] if args.name else {"zoo": str(folder), "models": models, "baselines": BASELINES,
                                                     "defaults": defaults, "retired": gone}
        print(json.dumps(doc, indent=2))
        return 0
    if args.name is not None:
        e = reg[args.name]
        r = e["recipe"]
        print(f"{args.name}: {e['description']}")
        for k, v in (("architecture", f"{e['arch']}, {e['params']:,} parameters"),
                     ("file", f"{folder / e['file']} ({_mb(e, folder)}, {e.get('dtype', '?')})"),
                     ("tasks", ", ".join(e["tasks"])), ("default for", ", ".join(e["default_for"]) or "-"),
                     ("data", e["data"]), ("steps", f"{e['steps']:,}"), ("config", r.get("config", "")),
                     ("command", r.get("command", "")), ("trained on", r.get("trained_on", "")),
                     ("scores measured", e.get("measured", {}).get("machine", ""))):
            if v:
                print(f"  {k:<16}: {v}")
        print("  scores (PSNR dB / SSIM; Y channel for SR and deraining, RGB for denoising):")
        print("\n".join(_scores(e)))
        for cmd in e.get("measured", {}).get("commands", []):
            print(f"    $ {cmd}")
        return 0
    print(f"bundled models ({folder}):")
    if not reg:
        print("  none")
    w = max([22, *(len(n) + 2 for n in reg), *(len(n) + 2 for n in BASELINES)])  # names never touch the next column
    print(f"  {'name':<{w}}{'arch':<7}{'params':>11}{'file':>10}  {'tasks':<30}default for")
    for name, e in reg.items():
        default = ("all its tasks" if e["default_for"] and set(e["default_for"]) == set(e["tasks"])
                   else ",".join(e["default_for"]) or "-")
        print(f"  {name:<{w}}{e['arch']:<7}{e['params']:>11,}{_mb(e, folder):>10}  {','.join(e['tasks']):<30} "
              f"{default}")
        print("\n".join(_scores(e)))
    print("baselines (no weights):")
    for name, desc in BASELINES.items():
        print(f"  {name:<{w}}{desc}")
    if gone:
        print(f"retired (no longer shipped; `edtir models NAME` shows one and how to get it back): {', '.join(gone)}")
    missing = [t for t in TASKS if t not in defaults]
    print("tasks without a default bundled model: " + (", ".join(missing) if missing else "none"))
    print("scores: PSNR dB / SSIM by `edtir eval` (Y channel for SR and deraining, RGB for denoising); "
          "`edtir models NAME` shows how each model was trained and measured")
    return 0
