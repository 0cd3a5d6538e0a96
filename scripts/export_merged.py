#!/usr/bin/env python
"""Thin entry point: see clipconv/app/cli/export_merged.py (python scripts/export_merged.py --help)."""
from clipconv.app.cli.export_merged import main

if __name__ == "__main__":
    raise SystemExit(main())
