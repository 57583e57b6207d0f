#!/usr/bin/env python
"""Benchmark image generation through the endpoint HTTP API (see docs/BENCHMARK.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: benchmark/

from benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
