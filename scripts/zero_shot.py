#!/usr/bin/env python
"""Thin entry point: see clipconv/app/cli/zero_shot.py (python scripts/zero_shot.py --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clipconv.app.cli.zero_shot import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
