"""One call on a GPU machine: the gpu profile's RankCLIP cell trained by `rankclip.train.fit` itself for a few
hundred steps from the local corpus (`rankclip make-corpus`: JPEG shards at 224 px), decoded by DataLoader
workers; records samples per second and the data-wait fraction per logging window (DVCLive's perf/ metrics),
peak GPU memory, and bf16 against fp32 loss terms on one batch of the corpus.

    python bench/gpu_corpus.py --corpus .gpu/corpus --workers 12 --steps 300 --out $OUT

`--profile smoke --device cpu --steps 4` runs the same path on a CPU in seconds (what tests would do).
Measures and prints; never passes or fails on time.
"""
import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import bf16_agreement  # noqa: E402

from rankclip.loading import fit_square, make_corpus, open_corpus  # noqa: E402
from rankclip.runs import resolve_run  # noqa: E402
from rankclip.study import load_params  # noqa: E402
from rankclip.train import fit  # noqa: E402


def windows(run: Path) -> list[dict]:
    "DVCLive's per-window perf metrics of a run: [{step, samples_per_s, data_wait_frac}]."
    base = run / "dvclive" / "plots" / "metrics" / "perf"
    cols = {}
    for name in ("samples_per_s", "data_wait_frac"):
        lines = (base / f"{name}.tsv").read_text().split("\n")[1:]
        cols[name] = {int(l.split("\t")[1]): float(l.split("\t")[2]) for l in lines if l.strip()}
    return [{"window": s, **{k: v[s] for k, v in cols.items()}} for s in sorted(cols["samples_per_s"])]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="a make-corpus folder (built at --size when absent)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--profile", default="gpu")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    corpus_dir = Path(a.corpus)
    if not (corpus_dir / "corpus.json").exists():
        t0 = time.perf_counter(); make_corpus(corpus_dir, size=a.size); print(f"corpus built in {time.perf_counter() - t0:.0f} s")
    info = json.loads((corpus_dir / "corpus.json").read_text())
    params = load_params("params.yaml", [f"train.data={info['pattern']}"])
    runs = Path(tempfile.mkdtemp())
    cfg = replace(resolve_run(params, "rankclip", 0, a.profile, runs_root=str(runs)), workers=a.workers, max_steps=a.steps,
                  log_every=20 if a.steps >= 100 else 1, progress=False, device=a.device, checkpoint_every=10 ** 9)
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = fit(cfg)
    wall = time.perf_counter() - t0
    win = windows(Path(cfg.out_dir))
    steady = win[1:] or win
    corpus = open_corpus(info["pattern"])
    captions = corpus.captions()[: cfg.batch_size]
    images = np.stack([fit_square(corpus.read(i)[0], cfg.image_size) for i in range(cfg.batch_size)])
    agree = bf16_agreement(replace(cfg, out_dir=str(runs / "agree"), max_steps=None), images, captions)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"device": device, "torch": torch.__version__, "corpus": info, "config": {k: getattr(cfg, k) for k in (
                  "image_encoder", "text_encoder", "image_size", "batch_size", "precision", "workers", "max_steps")},
              "wall_s": round(wall, 1), "summary": summary, "windows": win,
              "samples_per_s": round(float(np.mean([w["samples_per_s"] for w in steady])), 1),
              "data_wait_frac": round(float(np.mean([w["data_wait_frac"] for w in steady])), 4),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None,
              "bf16_vs_fp32": agree}
    (out / "gpu_corpus.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# gpu profile's RankCLIP cell from JPEG shards on {device}", "",
          f"`rankclip.train.fit` on the local corpus ({info['samples']:,} samples, {info['shards']} shards at {info['size']} px), "
          f"{cfg.workers} DataLoader workers, {cfg.image_encoder} + {cfg.text_encoder}, batch {cfg.batch_size}, {a.steps} steps, "
          f"{wall:.0f} s in all. Command: `python bench/gpu_corpus.py --workers {a.workers} --steps {a.steps}`.", "",
          f"- samples/s (mean of the logging windows after the first): **{result['samples_per_s']:,.0f}**",
          f"- data-wait fraction (same windows): **{result['data_wait_frac']:.3f}**",
          f"- peak GPU memory: {result['peak_memory_gib']} GiB", "",
          "| window ending at step | samples/s | data-wait fraction |", "|---:|---:|---:|"]
    md += [f"| {w['window']} | {w['samples_per_s']:,.0f} | {w['data_wait_frac']:.3f} |" for w in win]
    md += ["", "bf16 autocast against fp32 (TF32 off) on the corpus's first batch, same weights:", "",
           "| term | fp32 | bf16 | relative difference |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {v:.6f} | {agree['bf16'][k]:.6f} | {agree['relative_difference'][k]:.2e} |" for k, v in agree["fp32"].items()]
    (out / "gpu_corpus.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
