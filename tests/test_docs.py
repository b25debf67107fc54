"""The README's score tables say what the registry says (which a test re-measures for the default sr-x2 model):
a retrained model cannot leave stale numbers in the README."""

import importlib.util
from pathlib import Path

from edtir import zoo
from edtir.zoo import test_sets as sets_of  # (not named test_*: pytest would collect it)

README = Path(__file__).resolve().parents[1] / "README.md"
# The README's table writer (docs/ is not a package): its table parsing and cell format are shared here, and the
# last test checks the README is exactly what it writes.
_spec = importlib.util.spec_from_file_location("make_readme_tables", README.parent / "docs" / "make_readme_tables.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
score_cell = gen.score_cell


def table(lines: list[str], header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows of the table whose header line starts with ``header_start``."""
    start, end = gen.find_table(lines, header_start)
    return gen.cells(lines[start]), [gen.cells(ln) for ln in lines[start + 2:end]]


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
    text = README.read_text()
    assert gen.render(text) == text, "README.md tables are stale: run python docs/make_readme_tables.py"


def test_retired_models_table_is_what_the_generator_writes():
    text = gen.HISTORY.read_text()
    assert gen.render_history(text) == text, "docs/zoo-history.md is stale: run python docs/make_readme_tables.py"
    _, rows = table(text.splitlines(), gen.RETIRED_HEADER)
    gone = zoo.retired()
    assert {(r[0].strip("`"), r[1]) for r in rows} == {(n, t) for n, e in gone.items() for t in e["scores"]}
    assert all(r[2].strip("`") == gone[r[0].strip("`")]["retired"]["replaced_by"] for r in rows)
