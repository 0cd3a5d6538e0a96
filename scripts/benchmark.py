"""Benchmark Convpass on an open_clip image encoder (random init): forward, training-step precisions, memory.

    python scripts/benchmark.py --model ViT-B-16 --batch 8 --repeats 3 --out bench.json
    python scripts/benchmark.py loaders --images 256 --source 500x375   # data loaders (clipconv.app.bench_data)
    python scripts/benchmark.py scale --quick --threads 2               # ImageNet-scale rehearsal (bench_scale)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipconv.app.bench import main  # noqa: E402

if __name__ == "__main__":
    if sys.argv[1:2] == ["loaders"]:
        from clipconv.app.bench_data import main as loaders_main

        loaders_main(sys.argv[2:])
    elif sys.argv[1:2] == ["scale"]:
        from clipconv.app.bench_scale import main as scale_main

        scale_main(sys.argv[2:])
    else:
        main()
