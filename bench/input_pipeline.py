"""The input pipeline at the gpu and paper profiles' 224 px: samples per second decoded (JPEG), resized or
randomly cropped, batched (128) and tokenised, from the local corpus (`rankclip make-corpus`), through
`rankclip.loading.load_batches` exactly as training reads it, for 0, 1 and 2 DataLoader workers; from it the
per-core rate and the cores a GPU needs, against the GPU rates measured by bench/gpu_check.py.

    python bench/input_pipeline.py --corpus bench/.corpus --out bench/results

Builds the corpus (about 4,800 samples at 224 px, a few minutes) when --corpus has none. Measures and prints;
never passes or fails on time. Run it alone: two busy processes on two cores slow each other several-fold.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import cpu_name  # noqa: E402

from rankclip.loading import CorpusPairs, load_batches, make_corpus, open_corpus  # noqa: E402
from rankclip.models import create_model  # noqa: E402
from rankclip.train import GlobalBatchSampler  # noqa: E402


def rate(pairs, workers: int, batches: int, batch_size: int, chunk: int) -> dict:
    "Samples per second over `batches` batches after the first (worker start-up and first batch timed apart)."
    sampler = GlobalBatchSampler(len(pairs), batch_size, seed=0, chunk=chunk)
    index = list(sampler.epoch(0))[: batches + 1]
    t0 = time.perf_counter()
    stream = load_batches(pairs, index, epoch=0, workers=workers, prefetch=2)
    first = next(stream)
    t1 = time.perf_counter()
    n = sum(len(b.images) for b in stream)
    t2 = time.perf_counter()
    assert first.images.shape[1:] == (pairs.image_size, pairs.image_size, 3) and first.images.dtype == torch.uint8
    return {"samples_per_s": round(n / (t2 - t1), 1), "first_batch_s": round(t1 - t0, 2), "samples": n}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="bench/.corpus")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(1)
    corpus_dir = Path(a.corpus)
    if not (corpus_dir / "corpus.json").exists():
        t0 = time.perf_counter()
        make_corpus(corpus_dir, size=224)
        print(f"corpus built in {time.perf_counter() - t0:.0f} s")
    info = json.loads((corpus_dir / "corpus.json").read_text())
    tokenize = create_model(image_encoder="resnet10t", text_encoder="clip-12x512-quickgelu", embed_dim=32).tokenize
    rows = []
    for layout, spec in (("shards", info["pattern"]), ("table", info["table"])):
        corpus = open_corpus(spec)
        for augment in (False, True):
            pairs = CorpusPairs(corpus, tokenize, 224, augment=augment)
            for workers in (0, 1, 2):
                if layout == "table" and (augment or workers == 1): continue
                r = rate(pairs, workers, a.batches, a.batch_size, 1000 if layout == "shards" else 0)
                rows.append({"layout": layout, "augment": augment, "workers": workers, **r})
                print(rows[-1], flush=True)
    one = next(r["samples_per_s"] for r in rows if r["layout"] == "shards" and not r["augment"] and r["workers"] == 1)
    one_aug = next(r["samples_per_s"] for r in rows if r["layout"] == "shards" and r["augment"] and r["workers"] == 1)
    gpu = json.loads(Path("bench/results/gpu_check_h200.json").read_text())
    needs = []
    for g in gpu["rows"]:
        if g["image_size"] != 224: continue
        needs.append({"cell": g["cell"], "device": gpu["device"], "gpu_samples_per_s": g["samples_per_s"],
                      "cores": math.ceil(g["samples_per_s"] / one), "cores_augmented": math.ceil(g["samples_per_s"] / one_aug)})
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "corpus": info,
              "batch_size": a.batch_size, "rows": rows, "per_core_samples_per_s": one,
              "per_core_samples_per_s_augmented": one_aug, "gpu_needs": needs}
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / "input_pipeline.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Input pipeline at 224 px ({result['cpu']}, {result['cores']} cores, torch {result['torch']})", "",
          f"Corpus: `rankclip make-corpus` ({info['samples']:,} OpenMoji and Tux Paint drawings, JPEG quality 90 at "
          f"{info['size']} px, {info['shards']} shards and a CSV table). Batches of {a.batch_size} decoded, resized "
          "(or randomly cropped: augment) and tokenised by `rankclip.loading.load_batches`, as training reads them; "
          f"the rate over {a.batches} batches after the first. Command: `python bench/input_pipeline.py`.", "",
          "| layout | augment | workers | samples/s | first batch (s) |", "|---|---|---|---|---|"]
    md += [f"| {r['layout']} | {'yes' if r['augment'] else 'no'} | {r['workers']} | {r['samples_per_s']:,.0f} | {r['first_batch_s']} |" for r in rows]
    md += ["", f"One worker process, one core: **{one:,.0f} samples/s** ({one_aug:,.0f} with augmentation). The cores a GPU "
           "needs for its loader to keep up (GPU rates measured by bench/gpu_check.py, bench/results/gpu_check_h200.md):", "",
           "| cell | GPU | GPU samples/s | cores | cores, augmented |", "|---|---|---|---|---|"]
    md += [f"| {n['cell']} | {n['device']} | {n['gpu_samples_per_s']:,.0f} | {n['cores']} | {n['cores_augmented']} |" for n in needs]
    (out / "input_pipeline.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
