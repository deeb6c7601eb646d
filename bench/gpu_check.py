"""One call on a GPU machine: the gpu profile's cells trained by rankclip's own loop pieces (`setup_training`,
`train_step`) on embedded emoji drawings (upsampled from 32 px to 224 px on the GPU), and per cell the step
time, samples per second, data-wait fraction and peak memory; bf16 against fp32 loss terms on the same batch;
`torch.compile`; fp16 with its gradient scaler. Prints a Markdown table and writes JSON and Markdown to --out.

    python bench/gpu_check.py --images .gpu/emoji.npz --captions .gpu/captions.json --out $OUT

It measures and prints; it never passes or fails on time. Needs a CUDA device.
"""
import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rankclip.runs import TOKENIZER_DIR, resolve_run
from rankclip.study import load_params
from rankclip.text import train_tokenizer
from rankclip.train import (ImageTextPairs, build_model, cosine_lr, set_lr, setup_runtime, setup_training,
                            train_step)


def sync(device: torch.device) -> None:
    if device.type == "cuda": torch.cuda.synchronize(device)


def time_cell(cfg, images, captions, steps: int, warmup: int, label: str) -> dict:
    "Train `steps` (after `warmup`) steps of `cfg` on the given pairs; timings synchronised per step."
    rt = setup_runtime(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    pairs = ImageTextPairs(images, captions, model.tokenize)
    t = setup_training(cfg, rt, model, len(pairs))
    sync(rt.device)
    if rt.device.type == "cuda": torch.cuda.reset_peak_memory_stats()
    step_s, wait_s, first_s, terms = [], [], None, {}
    batches = iter(())
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        idx = next(batches, None)
        if idx is None:
            batches = t.sampler.epoch(step // t.steps_per_epoch)
            idx = next(batches)
        x, tokens = pairs.batch(idx)
        x = x.to(rt.device, non_blocking=True)
        tokens = {k: v.to(rt.device, non_blocking=True) for k, v in tokens.items()}
        t1 = time.perf_counter()
        set_lr(t.optimizer, cosine_lr(step, cfg.lr, cfg.warmup_steps, t.total_steps))
        terms, _ = train_step(t, x, tokens, epoch=0)
        sync(rt.device)
        t2 = time.perf_counter()
        first_s = first_s or t2 - t0
        if step >= warmup:
            step_s.append(t2 - t0)
            wait_s.append(t1 - t0)
    return {"cell": label, "image_encoder": cfg.image_encoder, "text_encoder": cfg.text_encoder, "precision": str(rt.dtype),
            "compile": cfg.compile, "batch_size": cfg.batch_size, "image_size": cfg.image_size, "steps": steps,
            "first_step_s": round(first_s, 2), "step_ms_median": round(1000 * float(np.median(step_s)), 1),
            "samples_per_s": round(cfg.batch_size * len(step_s) / sum(step_s), 1),
            "data_wait_frac": round(sum(wait_s) / sum(step_s), 4),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if rt.device.type == "cuda" else None,
            "final_terms": {k: round(float(v), 4) for k, v in terms.items()},
            "grad_scale": t.scaler.get_scale() if t.scaler.is_enabled() else None}


def bf16_agreement(cfg, images, captions) -> dict:
    "Loss terms of one batch under bf16 autocast against fp32 (TF32 off), same weights, training mode."
    rt = setup_runtime(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    t = setup_training(cfg, rt, model, len(captions))
    x = torch.as_tensor(images[:cfg.batch_size]).to(rt.device)
    tokens = {k: v.to(rt.device) for k, v in model.tokenize(captions[:cfg.batch_size]).items()}
    out = {}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with torch.no_grad(), torch.autocast(rt.device.type, dtype=dtype, enabled=dtype != torch.float32):
            o = t.model(x, tokens)
            out[name] = {k: float(v) for k, v in t.loss_fn(o["image_features"].float(), o["text_features"].float(),
                                                          o["logit_scale"].float(), epoch=1, num_epochs=cfg.epochs).items()}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rel = {k: abs(out["bf16"][k] - out["fp32"][k]) / max(abs(out["fp32"][k]), 1e-12) for k in out["fp32"]}
    return {"fp32": out["fp32"], "bf16": out["bf16"], "relative_difference": rel}


def markdown(rows: list[dict], agree: dict, device: str) -> str:
    lines = [f"# gpu profile on {device}", "",
             "rankclip's training loop pieces (`setup_training`, `train_step`) on 8,192 embedded emoji drawings "
             "(32 px, upsampled to 224 px on the GPU), global batch 128 unless stated; step times synchronised per step.",
             "", "| cell | image | text | precision | compile | batch | steps | first step s | step ms (median) | samples/s | "
             "data-wait fraction | peak GiB | final total loss |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cell']} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['cell']} | {r['image_encoder']} | {r['text_encoder']} | {r['precision'].replace('torch.', '')} | "
                     f"{r['compile']} | {r['batch_size']} | {r['steps']} | {r['first_step_s']} | {r['step_ms_median']} | {r['samples_per_s']} | "
                     f"{r['data_wait_frac']} | {r['peak_memory_gib']} | {r['final_terms'].get('total')} |")
    lines += ["", "bf16 autocast against fp32 (TF32 off) on the same batch and weights, RankCLIP cell:", "",
              "| term | fp32 | bf16 | relative difference |", "|---|---:|---:|---:|"]
    for k, v in agree["fp32"].items():
        lines.append(f"| {k} | {v:.6f} | {agree['bf16'][k]:.6f} | {agree['relative_difference'][k]:.2e} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="npz with `images` (N x 32 x 32 x 3 uint8)")
    p.add_argument("--captions", required=True, help="JSON list of N captions")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=150, help="timed steps of the RankCLIP cell")
    p.add_argument("--other-steps", type=int, default=30, help="timed steps of the other cells")
    p.add_argument("--profile", default="gpu", help="the params.yaml profile whose cells run (default: gpu)")
    p.add_argument("--device", default="auto", help="auto: CUDA when present")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    images = np.load(a.images)["images"]
    captions = json.loads(Path(a.captions).read_text())
    params = load_params("params.yaml")
    for family in ("bert", "roberta"):  # resolve_run points BERT/RoBERTa cells at these folders
        train_tokenizer(family, captions, 8192, Path(TOKENIZER_DIR) / family)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    runs = tempfile.mkdtemp()
    cfg = lambda cell, **kw: replace(resolve_run(params, cell, 0, a.profile, runs_root=runs), progress=False,
                                     device=a.device, **kw)
    rows, report = [], {"device": device, "torch": torch.__version__}

    def record(cell, **kw):
        label = " ".join([cell, *(f"{k}={v}" for k, v in kw.items())])
        try: row = time_cell(cfg(cell, **kw), images, captions, a.other_steps, 5, label)
        except Exception as e: row = {"cell": label, "error": f"{type(e).__name__}: {e}"[:500]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "gpu_check.json").write_text(json.dumps({**report, "rows": rows}, indent=1))

    rows.append(time_cell(cfg("rankclip"), images, captions, a.steps, 10, "rankclip"))
    print(json.dumps(rows[-1]), flush=True)
    report["bf16_vs_fp32"] = bf16_agreement(cfg("rankclip"), images, captions)
    print(json.dumps(report["bf16_vs_fp32"]), flush=True)
    record("rankclip", batch_size=512)
    for cell in ("clip", "resnet101_rankclip", "densenet121_rankclip", "bert_rankclip", "roberta_rankclip"):
        record(cell)
    record("rankclip", precision="fp16")
    record("rankclip", compile=True)
    text = markdown(rows, report["bf16_vs_fp32"], device)
    (out / "gpu_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
