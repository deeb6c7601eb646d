"""Time `rankclip evaluate` for one small checkpoint (resnet18 at 32 px, clip-2x128 text) on every registered
benchmark, in three situations: the first checkpoint with an empty cache (baseline features and probes
computed), a new checkpoint of the same architecture (baselines read from the cache: the per-checkpoint cost
in a study), and the same checkpoint again (every feature cached). Measures and prints;
never passes or fails on time.

    .venv/bin/python bench/evaluate.py [--prepared prepared] [--n-boot 1000] [--threads 2]
"""
import argparse, json, tempfile, time
from pathlib import Path

import torch

from rankclip.evaluate import evaluate_checkpoint
from rankclip.models import create_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", default="prepared", help="folder of the prepared sources")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--embed-dim", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in (1, 2):
            torch.manual_seed(seed)
            create_model("resnet18", "clip-2x128", embed_dim=a.embed_dim, image_size=32).save(tmp / f"run{seed}" / "model")
        rows = []
        for label, run in (("first checkpoint, empty cache", 1), ("new checkpoint, baselines cached", 2),
                           ("same checkpoint again", 2)):
            t0 = time.perf_counter()
            metrics = evaluate_checkpoint(tmp / f"run{run}" / "model", tmp / f"run{run}" / "eval", a.prepared,
                                          cache_dir=tmp / "cache", n_boot=a.n_boot)
            info = json.loads((tmp / f"run{run}" / "eval" / "details" / "_run.json").read_text())
            rows.append((label, time.perf_counter() - t0, info["cache"]))
        details = {f.stem: json.loads(f.read_text()) for f in (tmp / "run2" / "eval" / "details").glob("*.json")}
    print(f"checkpoint: resnet18 @ 32 px + clip-2x128, embed_dim {a.embed_dim}, {a.threads} threads, n_boot {a.n_boot}")
    for label, s, cache in rows: print(f"{label:>34}: {s:6.1f} s  (cache hits {cache['hits']}, misses {cache['misses']})")
    print("benchmarks (new checkpoint, baselines cached; seconds: that benchmark's or probe's own time):")
    for name in sorted(metrics):
        first, e = next(iter(metrics[name].items()))
        seconds = details.get(name, {}).get("seconds", details.get(name, {}).get("benchmark_seconds"))
        print(f"  {name:44s} {first:22s} {e['value']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}] n={e['n']:<6} "
              f"chance={e['chance'] if e['chance'] is None else round(e['chance'], 4)}  {seconds} s")


if __name__ == "__main__":
    main()
