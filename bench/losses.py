"""Forward+backward time and peak memory of the losses on this CPU; prints a markdown table, never asserts.

    .venv/bin/python bench/losses.py [--sizes 256 1024 4096] [--dim 1024] [--threads 2]

Cases, each at batch size N with D-dimensional unit embeddings and logit scale 1/0.07:
  clip            the CLIP loss from the embeddings (one N x N product forward, two backward)
  rank: ours      the four Plackett-Luce calls of RankCLIP (cross both ways, in-modal both ways) on
                  given N x N score matrices, with rankclip's closed-form gradient
  rank: plain     the same four calls written with autograd: argsort, gather, flip, logcumsumexp
  rank: allRank   the same four calls in the official code's (allRank's) float32 ListMLE form
  RankCLIP total  RankCLIPLoss() from the embeddings: CLIP + both ranking terms, every product included

Time: wall-clock and process CPU time (all threads), medians over 21 (N < 1024), 3 (N < 4096) or 1
(N >= 4096: one run takes seconds) repetitions, after one warm-up (none at N >= 4096). Memory: each case runs in its own process with
MALLOC_MMAP_THRESHOLD_ set so that glibc returns every freed buffer to the system; the peak resident
set (VmHWM, reset through /proc/self/clear_refs) during one forward+backward minus the resident set
just before it. So it counts everything the step allocates (saved tensors, temporaries, gradients),
not the inputs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rankclip.losses import RankCLIPLoss, allrank_listmle, clip_loss, plackett_luce_nll

CASES = ["clip", "rank: ours", "rank: plain", "rank: allRank", "RankCLIP total"]


def plain_plackett_luce(scores, target):
    "PL NLL per row written with autograd ops only."
    order = target.argsort(dim=-1, descending=True, stable=True)
    xs = scores.gather(-1, order)
    return (xs.flip(-1).logcumsumexp(-1).flip(-1) - xs).sum(-1)


def allrank(scores, target):
    return allrank_listmle(scores, target)


def four_calls(pl, s_it, s_ii, s_tt):
    "RankCLIP's four ranking calls: cross-modal both ways, in-modal both ways (targets carry no gradient)."
    s_ti = s_it.T
    return (pl(s_it, s_ti.detach()).sum() + pl(s_ti, s_it.detach()).sum()
            + pl(s_ii, s_tt.detach()).sum() + pl(s_tt, s_ii.detach()).sum())


def make_step(case, n, dim):
    "A closure running one forward+backward of `case`, returning the loss value."
    g = torch.Generator().manual_seed(n)
    u, v = (F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_() for _ in range(2))
    scale = torch.tensor(1 / 0.07)
    if case == "clip":
        return lambda: clip_loss(u, v, scale), (u, v)
    if case == "RankCLIP total":
        return lambda: RankCLIPLoss()(u, v, scale)["total"], (u, v)
    with torch.no_grad():
        mats = [(scale * a @ b.T).requires_grad_() for a, b in ((u, v), (u, u), (v, v))]
    pl = {"rank: ours": plackett_luce_nll, "rank: plain": plain_plackett_luce, "rank: allRank": allrank}[case]
    return lambda: four_calls(pl, *mats), mats


def proc_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_case(case, n, dim, reps):
    "Measure one case in this process: median time over `reps` runs, peak memory of the first; returns a dict."
    step, leaves = make_step(case, n, dim)

    def once():
        for t in leaves: t.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        loss.backward()
        return (time.perf_counter() - t0, time.process_time() - c0), loss.item()

    if reps > 1: once()  # warm-up, skipped for the largest size to keep the bench short
    for t in leaves: t.grad = None
    try:
        with open("/proc/self/clear_refs", "w") as f: f.write("5")
        before = proc_kb("VmRSS:")
        first, value = once()
        peak_mb = (proc_kb("VmHWM:") - before) / 1024
    except OSError:
        (first, value), peak_mb = once(), float("nan")
    times = [first] + [once()[0] for _ in range(reps - 1)]
    return {"case": case, "n": n, "seconds": statistics.median(t[0] for t in times),
            "cpu_seconds": statistics.median(t[1] for t in times), "reps": reps, "peak_mb": peak_mb, "value": value}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        n = int(args.one[1])
        print(json.dumps(run_case(args.one[0], n, args.dim, reps=1 if n >= 4096 else 3 if n >= 1024 else 21)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows, start = {}, time.perf_counter()
    for n in args.sizes:
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--one", case, str(n), "--dim", str(args.dim),
                                  "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=True)
            rows[case, n] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"torch {torch.__version__}, {args.threads} threads, D = {args.dim}, "
          f"{os.cpu_count()} CPUs visible, {time.perf_counter() - start:.0f} s in all\n")
    print("| N | case | fwd+bwd wall (ms) | fwd+bwd CPU (ms) | peak memory (MiB) | x CLIP (CPU) | value |")
    print("|---:|:---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        clip_cpu = rows["clip", n]["cpu_seconds"]
        for case in CASES:
            r = rows[case, n]
            print(f"| {n} | {case} | {1e3 * r['seconds']:.0f} | {1e3 * r['cpu_seconds']:.0f} | {r['peak_mb']:.1f} | "
                  f"{r['cpu_seconds'] / clip_cpu:.2f} | {r['value']:.7g} |")
    print("\n| N | ours vs plain: speed-up wall / CPU | memory ours / plain | value difference ours vs plain "
          "(relative) | ranking terms in RankCLIP total, x CLIP (CPU) |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        ours, plain, clip = rows["rank: ours", n], rows["rank: plain", n], rows["clip", n]
        extra = (rows["RankCLIP total", n]["cpu_seconds"] - clip["cpu_seconds"]) / clip["cpu_seconds"]
        print(f"| {n} | {plain['seconds'] / ours['seconds']:.2f}x / {plain['cpu_seconds'] / ours['cpu_seconds']:.2f}x | "
              f"{ours['peak_mb'] / plain['peak_mb']:.2f} | "
              f"{abs(ours['value'] - plain['value']) / abs(plain['value']):.1e} | {extra:.2f} |")
    print("\nThe machine is shared: wall times vary with other load; CPU time (all threads of the process) is "
          "steadier.")


if __name__ == "__main__":
    main()
