from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"

torch.set_num_threads(min(2, torch.get_num_threads()))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found (tests read ../shared beside the repo)")
    return path


@pytest.fixture
def data_dir() -> Path:
    return need(DATA)


@pytest.fixture
def reference_dir() -> Path:
    return need(REFERENCE)
