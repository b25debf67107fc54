"""Rewrite the README's two score tables from the model registry (``src/edtir/zoo/registry.json``), and the
retired models' table in docs/zoo-history.md from ``src/edtir/zoo/retired.json``.

    python docs/make_readme_tables.py            # rewrites both files in place (atomically)
    python docs/make_readme_tables.py --check    # exit 1 if either is not what this would write

The registry's scores are what ``python -m edtir.zoo.bundle`` measured with the ``edtir eval`` code; this script
only lays them out, so a retrained model cannot leave stale numbers in the README (``tests/test_docs.py`` checks
the same). The defaults table's baseline and published columns are not in the registry: they are kept from the
README as they stand, row by row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edtir import zoo
from edtir.data.io import atomic_write_bytes
from edtir.models.edt import TASKS

README = Path(__file__).resolve().parents[1] / "README.md"
HISTORY = README.parent / "docs" / "zoo-history.md"
DEFAULTS_HEADER = "| task | test set | default model |"
MODELS_HEADER = "| model | task | default | steps |"
RETIRED_HEADER = "| model | task | replaced by | steps |"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def score_cell(score: dict) -> str:
    return f"{score['psnr']:.2f} / {score['ssim']:.4f}"


def find_table(lines: list[str], header_start: str, source: str = "README.md") -> tuple[int, int]:
    """(first, end) line indices of the table whose header starts with ``header_start``."""
    start = next((i for i, ln in enumerate(lines) if ln.startswith(header_start)), None)
    if start is None:
        raise SystemExit(f"{source} has no table starting with {header_start!r}")
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return start, end


def defaults_table(reg: dict, old_rows: list[list[str]], header: list[str]) -> list[str]:
    """One row per task and test set: the default model's scores beside the baselines kept from ``old_rows``."""
    kept = {(r[0], r[1]): r[4:] for r in old_rows}
    extra = len(header) - 4
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, name in zoo.defaults().items():
        for dataset in zoo.test_sets(task):
            rest = kept.get((task, dataset), [""] * extra)
            row = [task, dataset, f"`{name}`", score_cell(reg[name]["scores"][task][dataset]), *rest]
            out.append("| " + " | ".join(row) + " |")
    return out


def model_order(reg: dict) -> list[str]:
    """The defaults first, in task order; then the others in registry order."""
    first = list(dict.fromkeys(zoo.defaults().values()))
    return first + [n for n in reg if n not in first]


def models_table(reg: dict, names: list[str], label: str, mark) -> list[str]:
    """One row per model and task it was scored on; its test sets' scores in the last columns. The third column,
    headed ``label``, is ``mark(entry, task)``: whether it is the task's default, or what replaced a retired one."""
    width = max(len(s) for s in zoo.TEST_SETS.values())
    header = ["model", "task", label, "steps"] + [f"test set {i + 1}: PSNR / SSIM" for i in range(width)]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        e = reg[name]
        for task in (t for t in TASKS if t in e["scores"]):
            scores = [f"{s} {score_cell(e['scores'][task][s])}" for s in zoo.test_sets(task)
                      if s in e["scores"][task]]
            row = [f"`{name}`", task, mark(e, task), f"{e['steps']:,}"]
            out.append("| " + " | ".join(row + scores + [""] * (width - len(scores))) + " |")
    return out


def render(text: str) -> str:
    reg = zoo.registry()
    lines = text.splitlines()
    s, e = find_table(lines, DEFAULTS_HEADER)
    lines[s:e] = defaults_table(reg, [cells(ln) for ln in lines[s + 2:e]], cells(lines[s]))
    s, e = find_table(lines, MODELS_HEADER)
    lines[s:e] = models_table(reg, model_order(reg), "default",
                              lambda entry, task: "yes" if task in entry["default_for"] else "")
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def render_history(text: str) -> str:
    lines = text.splitlines()
    s, e = find_table(lines, RETIRED_HEADER, "docs/zoo-history.md")
    gone = zoo.retired()
    lines[s:e] = models_table(gone, list(gone), "replaced by", lambda entry, _: f"`{entry['retired']['replaced_by']}`")
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a file differs from what would be written")
    args = ap.parse_args(argv)
    stale = []
    for path, make in ((README, render), (HISTORY, render_history)):
        old = path.read_text()
        new = make(old)
        if new == old:
            print(f"{path.name}: tables up to date")
        elif args.check:
            stale.append(path.name)
            print(f"{path.name}: tables are stale")
        else:
            atomic_write_bytes(path, lambda tmp, new=new: Path(tmp).write_text(new))
            print(f"{path.name}: tables rewritten")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
