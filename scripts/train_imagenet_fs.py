#!/usr/bin/env python
"""Thin entry point: see clipconv/cli/train.py (python scripts/train_imagenet_fs.py --help)."""
from clipconv.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
