"""The README's score tables say what the registry says (which a test re-measures for the default sr-x2 model):
a retrained model cannot leave stale numbers in the README."""

from pathlib import Path

from edtir import zoo
from edtir.zoo import test_sets as sets_of  # (not named test_*: pytest would collect it)

README = Path(__file__).resolve().parents[1] / "README.md"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table(lines: list[str], header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows of the README table whose header line starts with ``header_start``."""
    i = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[i]), rows


def score_cell(score: dict) -> str:
    return f"{score['psnr']:.2f} / {score['ssim']:.4f}"


def test_readme_defaults_table_names_each_tasks_default_and_its_scores():
    header, rows = table(README.read_text().splitlines(), "| task | test set | default model |")
    reg, defaults = zoo.registry(), zoo.defaults()
    col = header.index("PSNR / SSIM")
    seen = set()
    for row in rows:
        task, dataset, name = row[0], row[1], row[2].strip("`")
        assert name == defaults[task], (task, name, defaults[task])
        assert row[col] == score_cell(reg[name]["scores"][task][dataset]), (task, dataset, row[col])
        seen.add((task, dataset))
    assert seen == {(t, s) for t in defaults for s in sets_of(t)}, "every task and test set has a row"


def test_readme_models_table_has_every_model_and_its_scores():
    _, rows = table(README.read_text().splitlines(), "| model | task | default | steps |")
    reg = zoo.registry()
    seen = set()
    for row in rows:
        name, task = row[0].strip("`"), row[1]
        e = reg[name]
        assert (row[2] == "yes") == (task in e["default_for"]), (name, task, row[2])
        assert row[3] == f"{e['steps']:,}", (name, row[3])
        scores = [c for c in row[4:] if c]
        assert scores == [f"{s} {score_cell(e['scores'][task][s])}" for s in sets_of(task)], (name, task, scores)
        seen.add((name, task))
    assert seen == {(n, t) for n, e in reg.items() for t in e["scores"]}, "every model and task it was scored on"


def test_readme_tables_are_what_the_generator_writes():
    import subprocess
    import sys

    script = README.parent / "docs" / "make_readme_tables.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
