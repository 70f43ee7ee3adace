"""Fixtures shared by the test suite."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FNC_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data" / "fnc-yellow-sample"

# Cell counts of the four sample masks (8-connected components), from the data README.
FNC_SAMPLE_COUNTS = {
    "Mar19bS1C4R2_LHr_200x": 13,
    "Mar23bS1C2R3_VLPAGr_200x": 4,
    "Mar24bS1C2R3_LHl_200x": 6,
    "Mar32bS2C2R2_DMl_200x": 35,
}


@pytest.fixture(scope="session")
def fnc_sample_dir() -> Path:
    """Return the folder of the four real FNC sample images, or skip when it is absent."""
    if not (FNC_SAMPLE_DIR / "images").is_dir():
        pytest.skip(f"FNC sample data not found at {FNC_SAMPLE_DIR}; it lives in ../shared/data")
    return FNC_SAMPLE_DIR
