"""Speed / memory benchmark against torchvision: a thin wrapper of ``bench/benchmark.py``.

python scripts/benchmark.py --compare=torchvision      # same flags as bench/benchmark.py
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402

from bench.benchmark import main  # noqa: E402

if __name__ == "__main__":
    app.run(main)
