"""Time `load_prepared` per source (open: memory-map + labels + captions) and reading every pixel into memory.

    .venv/bin/python bench/load_prepared.py [--root prepared] [--repeat 5]

Measures and prints; never passes or fails on time. Run `rankclip prepare` (or `dvc repro prepare`) first.
"""
import argparse, statistics, time

import numpy as np

from rankclip.data import READERS, load_prepared


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="prepared")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'source':<14}{'items':>8}{'shape':>16}{'MB':>8}{'open ms (median)':>18}{'read all ms':>13}")
    for source in READERS:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter(); ps = load_prepared(source, args.root); times.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); np.array(ps.images); read = time.perf_counter() - t0
        print(f"{source:<14}{len(ps):>8}{str(tuple(ps.images.shape[1:])):>16}{ps.images.nbytes / 1e6:>8.1f}"
              f"{statistics.median(times) * 1e3:>18.1f}{read * 1e3:>13.1f}")


if __name__ == "__main__":
    main()
