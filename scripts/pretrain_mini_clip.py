#!/usr/bin/env python
"""Pretrain the miniature CLIP shipped in clipconv/assets (see clipconv/assets/MINI_CLIP.md)."""
import sys

from clipconv.app.pretrain_mini_clip import main

if __name__ == "__main__":
    sys.exit(main())
