"""Shared test setup: make the repository root importable and keep torch to one thread per test process."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "data", "pbmc68k_reduced.h5ad")
