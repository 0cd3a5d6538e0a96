#!/usr/bin/env python
"""Show (`info`) or remove (`clear`) clipconv's cached image features and demo worlds; see clipconv/app/cache.py."""
import sys

from clipconv.app.cache import main

if __name__ == "__main__":
    sys.exit(main())
