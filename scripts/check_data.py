"""Check an ImageNet-family data root: `python scripts/check_data.py --data-root $DATA [--verify]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clipconv.app.cli.check_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
