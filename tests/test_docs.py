"""The README's score table says what the registry says (which a test re-measures for the default sr-x2 model):
a retrained model cannot leave stale numbers in the README."""

from pathlib import Path

from edtir import zoo

README = Path(__file__).resolve().parents[1] / "README.md"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_readme_scores_match_the_registry():
    lines = README.read_text().splitlines()
    reg = zoo.registry()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| task | test set |"))
    columns = {j: name for j, c in enumerate(cells(lines[header])) for name in reg if c.split(" ")[0] == name}
    assert set(columns.values()) == set(reg), "every bundled model has a column"
    checked = 0
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        row = cells(line)
        task, dataset = row[0], row[1]
        for j, name in columns.items():
            score = reg[name]["scores"].get(task, {}).get(dataset)
            if score is None:
                assert row[j] == "", (name, task, dataset)
                continue
            assert row[j] == f"{score['psnr']:.2f} / {score['ssim']:.4f}", (name, task, dataset, row[j])
            checked += 1
    assert checked == sum(len(sets) for e in reg.values() for sets in e["scores"].values())
