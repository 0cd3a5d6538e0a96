#!/usr/bin/env python
"""Thin entry point: see clipconv/app/cli/eval_robustness.py (python scripts/eval_robustness.py --help)."""
from clipconv.app.cli.eval_robustness import main

if __name__ == "__main__":
    raise SystemExit(main())
