"""Samples/s of one full training step (forward, loss, backward, AdamW step) of our dual encoder
against open_clip's own model at the same architecture, resolution and batch, in one run; with
--dead-taps, our step and image tower with and without rankclip.conv's dead-tap skipping instead.

    .venv/bin/python bench/train_step.py [--batch 128] [--image-encoder resnet18] [--image-size 32]
        [--text-encoder clip-2x128] [--steps 20] [--device cpu|cuda]
    .venv/bin/python bench/train_step.py --dead-taps [--encoders resnet18,resnet34,densenet121]
        [--out bench/results/train_step.md]

Prints a markdown table (and with --dead-taps writes it to --out, with the machine's fp32 matmul
GFLOP/s and load average: other processes on the machine slow both columns alike, not the ratio).
Measures, never asserts. Every model sees the same real emoji images and captions from prepared/.
"""
import argparse
import datetime
import os
import statistics
import time

import numpy as np
import torch


def batches(n_batch, batch, root):
    "The first n_batch * batch emoji drawings and captions as (uint8 NHWC, captions) batches."
    from rankclip.data import load_prepared
    src = load_prepared("emoji", root)
    imgs = np.array(src.images[: n_batch * batch])
    caps = src.captions[: n_batch * batch]
    return [(torch.from_numpy(imgs[i * batch:(i + 1) * batch]), caps[i * batch:(i + 1) * batch]) for i in range(n_batch)]


def time_steps(step, data, warmup, sync):
    "Median seconds per step after `warmup` steps."
    times = []
    for i, (images, tokens) in enumerate(data):
        t0 = time.perf_counter()
        step(images, tokens)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n=2048, repeats=5):
    "fp32 GFLOP/s of an n x n by n x n matrix product on the CPU, best of `repeats`."
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def cpu_name():
    "The CPU's model name (rankclip.train.cpu_info, as every run.json records it)."
    from rankclip.train import cpu_info
    return cpu_info()["model"]


def ours(args, device, data):
    from rankclip.losses import RankCLIPLoss
    from rankclip.models import create_model
    from rankclip.config import TrainConfig
    from rankclip.train import build_optimizer
    torch.manual_seed(0)
    model = create_model(args.image_encoder, args.text_encoder, args.embed_dim, args.image_size).to(device)
    opt = build_optimizer(model, TrainConfig())
    losses = {"clip": RankCLIPLoss(0.0, 0.0), "rankclip": RankCLIPLoss(1 / 16, 1 / 16)}
    tokenized = [(im, model.tokenize(c)) for im, c in data]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make(loss):
        def step(images, tokens):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(images.to(device), {k: v.to(device) for k, v in tokens.items()})
            total = loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())["total"]
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        return step
    return {name: make(l) for name, l in losses.items()}, tokenized, model


def open_clip_step(args, device, data, our_model):
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from rankclip.models import text_spec
    spec = text_spec(args.text_encoder)
    assert spec["family"] == "clip", "open_clip comparison needs a CLIP text encoder"
    torch.manual_seed(0)
    model = open_clip.CLIP(
        args.embed_dim,
        CLIPVisionCfg(timm_model_name=args.image_encoder, timm_model_pretrained=False, timm_pool="avg",
                      timm_proj="linear", image_size=args.image_size),
        CLIPTextCfg(context_length=spec["context_length"], vocab_size=49408, width=spec["width"],
                    heads=spec["heads"], layers=spec["layers"])).to(device)
    tokenizer = open_clip.get_tokenizer("RN50")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=5e-4)
    loss = ClipLoss()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # open_clip's transforms run per image in DataLoader workers; here the same normalisation runs
    # batched on the device, so both steps start from uint8 images and token ids.
    tokenized = [(im, tokenizer(c)) for im, c in data]

    def step(images, tokens):
        x = images.to(device).permute(0, 3, 1, 2).float().div(255)
        if x.shape[-1] != args.image_size:
            x = torch.nn.functional.interpolate(x, size=args.image_size, mode="bicubic", antialias=True)
        x = (x - mean) / std
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            img, txt, scale = model(x, tokens.to(device))
        total = loss(img.float(), txt.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    return step, tokenized, n_params


def dead_taps_table(args, device, data, sync):
    "Markdown: image tower forward + backward and full CLIP-loss step, plain convolutions against dead taps skipped."
    from rankclip.conv import crop_dead_taps, tap_plans
    load_before, gflops = os.getloadavg(), matmul_gflops()
    rows = []
    for name in args.encoders.split(","):
        steps, tokenized, model = ours(argparse.Namespace(**{**vars(args), "image_encoder": name}), device, data)
        encoder = model.image_encoder
        pixels = [(encoder.preprocess(images.to(device)), None) for images, _ in data]
        n_cropped = len(tap_plans(encoder, pixels[0][0]))
        # a random projection, not .sum(): through BatchNorm, the gradient of a sum cancels to denormal round-off
        projection = torch.randn(args.batch, args.embed_dim, generator=torch.Generator().manual_seed(0)).to(device)

        def tower(px, _):
            encoder.zero_grad(set_to_none=True)
            (encoder(px) * projection).sum().backward()
        sec = {}
        for _ in range(2):  # interleaved rounds: background load hits both alike
            for on in (False, True):
                crop_dead_taps(model, enabled=on)
                sec.setdefault((on, "tower"), []).append(time_steps(tower, pixels, args.warmup, sync))
                sec.setdefault((on, "step"), []).append(time_steps(steps["clip"], tokenized, args.warmup, sync))
        best = {k: min(v) for k, v in sec.items()}
        for on in (False, True):
            rows.append(f"| {name} | {f'{n_cropped} skip dead taps' if on else 'all plain'} | {1000 * best[on, 'tower']:.0f} | "
                        f"{1000 * best[on, 'step']:.0f} | {args.batch / best[on, 'step']:.0f} | "
                        f"{best[False, 'tower'] / best[on, 'tower']:.2f}x | {best[False, 'step'] / best[on, 'step']:.2f}x |")
        print(rows[-2], rows[-1], sep="\n", flush=True)
    load_after = os.getloadavg()
    return "\n".join([
        f"# Training step with and without dead-tap skipping (`rankclip.conv`)\n",
        f"{datetime.date.today()}, {cpu_name()}, {device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
        f"fp32 matmul (2048 x 2048) {gflops:.0f} GFLOP/s; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.2f}' for x in load_before)} before and {', '.join(f'{x:.2f}' for x in load_after)} after "
        f"(this benchmark's own threads count in the latter; beyond them, other processes shared the cores).\n",
        f"Image encoder at {args.image_size} px + {args.text_encoder}, embed {args.embed_dim}, batch {args.batch}, float32. "
        f"Tower: the image encoder's forward and backward on preprocessed pixels. Step: the full training step "
        f"(both encoders, CLIP loss, backward, AdamW). Median of {args.steps} after {args.warmup} warm-up, best of 2 "
        f"interleaved rounds.\n",
        "| image encoder | convolutions | tower ms | step ms | samples/s | tower speed-up | step speed-up |",
        "|---|---|---|---|---|---|---|", *rows, ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-encoder", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--text-encoder", default="clip-2x128")
    ap.add_argument("--embed-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prepared", default="prepared")
    ap.add_argument("--dead-taps", action="store_true", help="compare our step with and without dead-tap skipping")
    ap.add_argument("--encoders", default="resnet18,resnet34,densenet121", help="image encoders for --dead-taps")
    ap.add_argument("--out", default="bench/results/train_step.md", help="where --dead-taps writes its table")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = batches(args.steps + args.warmup, args.batch, args.prepared)
    if args.dead_taps:
        from rankclip.files import write_text
        table = dead_taps_table(args, device, data, sync)
        print("\n" + table)
        write_text(args.out, table)
        return

    steps, ours_data, model = ours(args, device, data)
    oc_step, oc_data, oc_params = open_clip_step(args, device, data, model)
    rows = {}
    # interleave the measurements so that background load hits both alike
    for name in ("open_clip", "clip", "rankclip", "open_clip_2", "clip_2", "rankclip_2"):
        base = name.removesuffix("_2")
        if base == "open_clip":
            t = time_steps(oc_step, oc_data, args.warmup, sync)
        else:
            t = time_steps(steps[base], ours_data, args.warmup, sync)
        rows.setdefault(base, []).append(t)
    sec = {k: min(v) for k, v in rows.items()}
    n_ours = sum(p.numel() for p in model.parameters())
    print(f"\n{args.image_encoder} {args.image_size}px + {args.text_encoder}, embed {args.embed_dim}, batch {args.batch}, "
          f"{device} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"params ours {n_ours / 1e6:.2f} M, open_clip {oc_params / 1e6:.2f} M; median of {args.steps} steps, best of 2 rounds\n")
    print("| step | s/step | samples/s | vs open_clip |")
    print("|---|---|---|---|")
    for name, label in (("open_clip", "open_clip CLIP (ClipLoss)"), ("clip", "rankclip, CLIP loss"),
                        ("rankclip", "rankclip, RankCLIP loss (1/16, 1/16)")):
        print(f"| {label} | {sec[name]:.4f} | {args.batch / sec[name]:.0f} | {sec['open_clip'] / sec[name]:.2f}x |")
    print(f"\nRankCLIP step overhead over our CLIP-only step: {100 * (sec['rankclip'] / sec['clip'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
