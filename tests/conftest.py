import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The SciPy baselines live in benchmarks/ (not part of the installed package).
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # test helpers (tiny_hf.py) under importlib import mode
