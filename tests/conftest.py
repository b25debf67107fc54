from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
REFERENCE = SHARED / "reference"

# One thread: CI machines have 2 cores, and two OpenMP threads that wait on each other under load are far
# slower than one.
torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def official_pair():
    """The official EDT-T SR x2 state dict (random weights) and the official code's input/output for it."""
    d = need(REFERENCE / "official-output")
    state = np.load(d / "SRx2_EDTT_random_state.npz")
    io = np.load(d / "SRx2_EDTT_random_io.npz")
    return {k: torch.from_numpy(v) for k, v in state.items()}, io
