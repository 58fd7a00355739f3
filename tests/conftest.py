"""Shared test setup: make the repository root importable and keep torch to one thread per test process."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "data", "pbmc68k_reduced.h5ad")


@pytest.fixture(autouse=True)
def release_out_dir_locks():
    """A script's main() run in the test process keeps its --out-dir locked until the process ends; let
    go after each test, so that no later test finds a folder locked (cello is not imported here: the
    tests of reward.py and puzzles.py run without torch)."""
    yield
    if "cello" in sys.modules:
        sys.modules["cello"].release_out_dirs()
