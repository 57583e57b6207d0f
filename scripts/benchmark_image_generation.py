#!/usr/bin/env python
"""Benchmark image generation through the endpoint HTTP API (see docs/BENCHMARK.md)."""

import sys


from benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
