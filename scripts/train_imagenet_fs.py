#!/usr/bin/env python
"""Thin entry point: see clipconv/app/cli/train.py (python scripts/train_imagenet_fs.py --help)."""
from clipconv.app.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
