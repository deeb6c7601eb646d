"""Tests of rankclip.losses against float64 brute force, hand-computed cases, the official code's
normalisation and CyCLIP's formula, plus properties, precision, skipped work and a real 2-process run."""
import itertools
import math
import queue as queue_module
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rankclip.losses import (CyCLIPLoss, RankCLIPLoss, allrank_listmle, clip_loss, contrastive_labels,
                             official_ramp_weight, plackett_luce_nll)

E = math.exp


def pl_brute(x, y, w=None):
    "Float64 PL NLL of one row with explicit loops; ties in `y` broken by the lower index first."
    order = sorted(range(len(y)), key=lambda j: (-float(y[j]), j))
    xs = [float(x[j]) for j in order]
    w = [1.0] * len(xs) if w is None else [float(v) for v in w]
    total = 0.0
    for k in range(len(xs)):
        m = max(xs[k:])
        total += w[k] * (m + math.log(sum(math.exp(v - m) for v in xs[k:])) - xs[k])
    return total


def rows_brute(a, b, w=None):
    return torch.tensor([pl_brute(x, y, w) for x, y in zip(a, b)], dtype=torch.float64)


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1) for _ in range(2))


def brute_terms(u, v, s, w=None):
    "RankCLIP's cross and in-modal terms by explicit loops over rows and positions (float64)."
    u, v, s = u.double(), v.double(), float(s)
    s_it, s_ii, s_tt = s * u @ v.T, s * u @ u.T, s * v @ v.T
    n = len(u)
    norm = n if w is None else float(sum(w))
    def two_way(a, b):
        return sum(pl_brute(a[i], b[i], w) + pl_brute(b[i], a[i], w) for i in range(n)) / (2 * n * norm)
    return two_way(s_it, s_it.T), two_way(s_ii, s_tt)


# --- plackett_luce_nll -------------------------------------------------------------------------

def test_pl_hand_computed_3x3():
    x = torch.tensor([[1., 2., 3.], [1., 2., 3.], [3., 2., 1.]], requires_grad=True)
    # row 0: target ranks column 2, then 0, then 1 -> sorted scores (3, 1, 2)
    # row 1: tie between columns 0 and 1 -> column 0 first -> sorted scores (1, 2, 3)
    # row 2: target agrees with the scores -> sorted scores (3, 2, 1)
    y = torch.tensor([[0.5, 0.1, 0.9], [1., 1., 0.], [7., 5., -2.]])
    nll = plackett_luce_nll(x, y)
    expected = [math.log(E(3) + E(1) + E(2)) - 3 + math.log(E(1) + E(2)) - 1 + 0,
                math.log(E(1) + E(2) + E(3)) - 1 + math.log(E(2) + E(3)) - 2 + 0,
                math.log(E(3) + E(2) + E(1)) - 3 + math.log(E(2) + E(1)) - 2 + 0]
    assert nll.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[0] == pytest.approx(1.7208676, rel=1e-6)
    nll.sum().backward()
    # row 0: d/dx_j = sum over the suffixes containing j of softmax(suffix)_j, minus 1
    z1, z2 = E(3) + E(1) + E(2), E(1) + E(2)
    g0 = [E(1) / z1 + E(1) / z2 - 1, E(2) / z1 + E(2) / z2 + 1 - 1, E(3) / z1 - 1]
    assert x.grad[0].tolist() == pytest.approx(g0, abs=1e-6)
    assert x.grad.sum(-1).abs().max() < 1e-6  # each row's gradient sums to zero (shift invariance)


def test_pl_tie_breaking_is_stable_lower_index_first():
    x = torch.tensor([[0., 5., 1., 2.]])
    y = torch.tensor([[1., 1., 1., 1.]])
    assert plackett_luce_nll(x, y).item() == pytest.approx(pl_brute([0, 5, 1, 2], [0, -1, -2, -3]), rel=1e-6)
    # a different tie order gives a different value, so the test above can tell orders apart
    assert pl_brute([0, 5, 1, 2], [0, -1, -2, -3]) != pytest.approx(pl_brute([0, 5, 1, 2], [0, 1, 2, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,m,levels", [(1, 1, 3), (5, 9, 100), (6, 12, 3), (3, 40, 1000)])
def test_pl_matches_brute_force(dtype, weighted, n, m, levels):
    g = torch.Generator().manual_seed(n * m + levels)
    x = (torch.randn(n, m, generator=g, dtype=torch.float64) * 4).to(dtype)
    y = torch.randint(0, levels, (n, m), generator=g).to(dtype)  # few levels: many ties
    w = torch.rand(m, generator=g, dtype=torch.float64) if weighted else None
    ref = rows_brute(x.double(), y, w)
    got = plackett_luce_nll(x, y, w)
    assert got.dtype == dtype
    assert torch.allclose(got.double(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)
    xg = x.clone().requires_grad_()
    plackett_luce_nll(xg, y, w).sum().backward()
    with torch.no_grad():  # the value-only path agrees with the autograd path
        assert torch.equal(plackett_luce_nll(xg, y, w), got)


@pytest.mark.parametrize("weighted", [False, True])
def test_pl_gradcheck_with_ties(weighted):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 8, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(0, 3, (4, 8), generator=g).double()
    w = torch.rand(8, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    assert torch.autograd.gradcheck(lambda s: plackett_luce_nll(s, y, w), (x,))
    # weighting the rows of the output exercises grad_output in the backward
    r = torch.randn(4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: plackett_luce_nll(s, y, w) * r, (x,))


def test_pl_no_gradient_through_target():
    x, y = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    plackett_luce_nll(x, y).sum().backward()
    assert y.grad is None and x.grad is not None


def test_pl_minimised_when_rankings_agree():
    values = [0.3, -1.2, 2.0, 0.9]
    target = torch.tensor([[0.1, 4.0, -3.0, 1.0]])
    losses = {p: plackett_luce_nll(torch.tensor([p]), target).item() for p in itertools.permutations(values)}
    best = min(losses, key=losses.get)
    # the minimiser orders the scores as the target orders the columns
    assert sorted(range(4), key=lambda j: -best[j]) == sorted(range(4), key=lambda j: -target[0, j].item())
    assert sorted(losses.values())[1] > losses[best] + 1e-3


def test_pl_exact_and_finite_at_logit_scale_100_where_allrank_is_off():
    u, v = unit(64, 4, seed=1)
    for a in (100 * u @ v.T, 100 * u @ u.T):  # random rankings, and agreeing ones
        a32 = a.float()
        ref = rows_brute(a32.double(), a32.T.double())  # same float32 inputs, exact arithmetic
        x = a32.clone().requires_grad_()
        ours = plackett_luce_nll(x, a32.T)
        ours.sum().backward()
        assert torch.allclose(ours.double(), ref, rtol=1e-5)
        assert torch.isfinite(x.grad).all() and torch.isfinite(ours).all()
        allrank = allrank_listmle(a32, a32.T.contiguous(), torch.Generator().manual_seed(0)).double()
        assert ((allrank - ref).abs() / ref).max() > 0.1


def test_allrank_reimplementation_agrees_at_small_scale():
    u, v = unit(16, 8, seed=2)
    a = 3 * u @ v.T
    ref = rows_brute(a, a.T.contiguous())
    assert torch.allclose(allrank_listmle(a, a.T.contiguous()), ref, rtol=1e-6)


def test_pl_bf16_inputs_ordered_and_summed_in_float32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 30, generator=g).bfloat16().requires_grad_()
    y = torch.randn(4, 30, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = plackett_luce_nll(x, y)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), rows_brute(x.detach().double(), y.double()), rtol=1e-5)
    got.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_pl_bad_input_errors():
    with pytest.raises(ValueError, match="N x M"):
        plackett_luce_nll(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-negative"):
        plackett_luce_nll(torch.randn(3, 4), torch.randn(3, 4), -torch.ones(4))


# --- CLIP and RankCLIP ---------------------------------------------------------------------------

def test_clip_loss_matches_open_clip_and_definition():
    from open_clip.loss import ClipLoss  # imported here: the spawned workers below need not load it
    u, v = unit(9, 5, seed=4, dtype=torch.float32)
    s = torch.tensor(33.0)
    logits = (s * u @ v.T).double()
    by_def = -sum(logits[i].log_softmax(0)[i] + logits[:, i].log_softmax(0)[i] for i in range(9)) / 18
    assert clip_loss(u, v, s).item() == pytest.approx(by_def.item(), rel=1e-5)
    assert torch.allclose(clip_loss(u, v, s), ClipLoss()(u, v, s), atol=1e-6)
    assert contrastive_labels(9, 0, u.device) is contrastive_labels(9, 0, u.device)


@pytest.mark.parametrize("decay", [False, True])
def test_rankclip_terms_match_brute_force(decay):
    u, v = unit(7, 3, seed=5)
    s = 37.0
    out = RankCLIPLoss(lambda_cross=0.3, lambda_in=0.7, position_decay=decay)(u, v, s)
    w = [1 / math.log(k + 1) for k in range(1, 8)] if decay else None
    cross, in_modal = brute_terms(u, v, s, w)
    assert out["cross"].item() == pytest.approx(cross, rel=1e-10)
    assert out["in"].item() == pytest.approx(in_modal, rel=1e-10)
    assert out["total"].item() == pytest.approx(clip_loss(u, v, s).item() + 0.3 * cross + 0.7 * in_modal, rel=1e-10)
    assert set(out) == {"clip", "cross", "in", "total"}


def official_total(u, v, s, epoch=None, epochs=None):
    "The official code's get_loss formula, re-written here: each ListMLE direction /32, then /batch size."
    s_it = s * u @ v.T
    s_ti = s_it.T
    listmle = lambda a, b: rows_brute(a, b).mean()  # allRank ListMLE: mean over rows of sums over positions
    contrastive = (F.cross_entropy(s_it, torch.arange(len(u))) + F.cross_entropy(s_ti, torch.arange(len(u)))) / 2
    inmodal = (listmle(s * u @ u.T, s * v @ v.T) + listmle(s * v @ v.T, s * u @ u.T)) / 32
    crossmodal = (listmle(s_it, s_ti) + listmle(s_ti, s_it)) / 32
    rank_weight = 1.0
    if epoch is not None:
        rank_weight = min(2.0, max(0.0, (3.0 * (min(epoch, epochs) - 1)) / (epochs - 1)))
    batch_size = len(s_it)
    return contrastive + rank_weight * (crossmodal / batch_size + inmodal / batch_size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_normalisation_reproduced(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
    u, v = unit(n, d, seed=seed + 10)
    s = float(torch.empty(1).uniform_(1, 100, generator=g))
    assert RankCLIPLoss()(u, v, s)["total"].item() == pytest.approx(official_total(u, v, s).item(), rel=1e-10)
    for epoch in (1, 5, 20, 32):
        ours = RankCLIPLoss(official_ramp=True)(u, v, s, epoch=epoch, num_epochs=32)["total"]
        assert ours.item() == pytest.approx(official_total(u, v, s, epoch, 32).item(), rel=1e-10)


def test_official_ramp_values_and_errors():
    assert [official_ramp_weight(e, 11) for e in (1, 2, 6, 8, 11)] == pytest.approx([0, 0.3, 1.5, 2.0, 2.0])
    u, v = unit(4, 3, seed=6)
    for kwargs in ({}, {"epoch": 3}, {"epoch": 0, "num_epochs": 10}, {"epoch": 1, "num_epochs": 1}):
        with pytest.raises(ValueError, match="epoch"):
            RankCLIPLoss(official_ramp=True)(u, v, 10.0, **kwargs)


def test_rankclip_gradcheck():
    g = torch.Generator().manual_seed(8)
    u = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    for loss in (RankCLIPLoss(), RankCLIPLoss(lambda_cross=0.5, lambda_in=2.0, position_decay=True)):
        assert torch.autograd.gradcheck(lambda a, b, c: loss(a, b, c)["total"], (u, v, s))


def test_bf16_autocast_keeps_float32_similarities_and_ordering():
    u, v = unit(48, 16, seed=9, dtype=torch.float32)
    s = torch.tensor(100.0)
    plain = RankCLIPLoss()(u, v, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = RankCLIPLoss()(u, v, s)
        bf16_sims = (s * u) @ v.T  # what autocast would make of the product left to itself
    assert bf16_sims.dtype == torch.bfloat16
    for k in plain:
        assert auto[k].dtype == torch.float32
        assert torch.allclose(auto[k], plain[k], rtol=1e-6), k
    # the bf16 similarities rank differently, so a bf16 ordering would have been caught above
    a = bf16_sims.float()
    assert not torch.equal(torch.sort(a, dim=-1, stable=True).indices, torch.sort((s * u) @ v.T, dim=-1, stable=True).indices)
    assert abs(RankCLIPLoss().terms(u, v, s)["cross"] - ((plackett_luce_nll(a, a.T).mean()
               + plackett_luce_nll(a.T, a).mean()) / (2 * 48))) > 1e-4


def count_work(loss, u, v, s, monkeypatch):
    "Matrix-product flops (FlopCounterMode) and torch.sort calls of one call of `loss`."
    from torch.utils.flop_counter import FlopCounterMode
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    with FlopCounterMode(display=False) as fc:
        out = loss(u, v, s)
    monkeypatch.setattr(torch, "sort", real_sort)
    return fc.get_total_flops(), len(sorts), out


def test_zero_lambdas_skip_their_work(monkeypatch):
    n, d = 16, 8
    u, v = unit(n, d, seed=11, dtype=torch.float32)
    one_product = 2 * n * n * d
    full = count_work(RankCLIPLoss(), u, v, 10.0, monkeypatch)
    rank_c = count_work(RankCLIPLoss(lambda_in=0), u, v, 10.0, monkeypatch)
    rank_i = count_work(RankCLIPLoss(lambda_cross=0), u, v, 10.0, monkeypatch)
    clip = count_work(RankCLIPLoss(lambda_cross=0, lambda_in=0), u, v, 10.0, monkeypatch)
    assert (full[0], full[1]) == (3 * one_product, 4)
    assert (rank_c[0], rank_c[1]) == (one_product, 2)  # S_II and S_TT never built
    assert (rank_i[0], rank_i[1]) == (3 * one_product, 2)
    assert (clip[0], clip[1]) == (one_product, 0)
    assert rank_c[2]["in"].item() == 0 and rank_i[2]["cross"].item() == 0
    assert clip[2]["total"].item() == pytest.approx(clip_loss(u, v, 10.0).item(), rel=1e-6)
    cyc = count_work(CyCLIPLoss(lambda_in=0), u, v, 10.0, monkeypatch)
    assert cyc[0] == one_product and cyc[2]["cyclic_in"].item() == 0


# --- CyCLIP ----------------------------------------------------------------------------------------

def test_cyclip_matches_loops():
    u, v = unit(6, 4, seed=12)
    s = 25.0
    out = CyCLIPLoss(lambda_in=0.3, lambda_cross=0.6)(u, v, s)
    n = len(u)
    dot = lambda a, b: float(a @ b)
    cyc_in = sum((dot(u[i], u[j]) - dot(v[i], v[j])) ** 2 for i in range(n) for j in range(n)) / n
    cyc_cross = sum((dot(u[i], v[j]) - dot(v[i], u[j])) ** 2 for i in range(n) for j in range(n)) / n
    assert out["cyclic_in"].item() == pytest.approx(cyc_in, rel=1e-10)
    assert out["cyclic_cross"].item() == pytest.approx(cyc_cross, rel=1e-10)
    assert out["total"].item() == pytest.approx(clip_loss(u, v, s).item() + 0.3 * cyc_in + 0.6 * cyc_cross, rel=1e-10)
    # CyCLIP's own code: mean over the N^2 entries of the scaled logits' squared difference, / s^2, * N
    st = s * u @ v.T
    assert out["cyclic_cross"].item() == pytest.approx(((st - st.T).square().mean() / s**2 * n).item(), rel=1e-10)


# --- properties -----------------------------------------------------------------------------------

LOSSES = [RankCLIPLoss(), RankCLIPLoss(position_decay=True), RankCLIPLoss(lambda_in=0), CyCLIPLoss()]


@pytest.mark.parametrize("loss", LOSSES)
def test_batch_permutation_leaves_terms_unchanged(loss):
    u, v = unit(11, 5, seed=13)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    a, b = loss(u, v, 30.0), loss(u[perm], v[perm], 30.0)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-10), k


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("cuts", [(5,), (1, 2, 9), (3, 4, 5, 6, 7, 8)])
def test_local_loss_over_any_split_equals_global(loss, cuts):
    u, v = unit(12, 5, seed=14)
    s = torch.tensor(50.0, dtype=torch.float64)
    whole = loss(u, v, s)
    bounds = [0, *cuts, 12]
    acc = {k: 0.0 for k in whole}
    for lo, hi in zip(bounds, bounds[1:]):
        local = loss.terms(u[lo:hi], v[lo:hi], s, u, v, row_offset=lo)
        acc = {k: acc[k] + local[k] * (hi - lo) / 12 for k in whole}
    for k in whole:
        assert torch.allclose(acc[k], whole[k], rtol=1e-10), k
    clip_parts = sum(clip_loss(u[lo:hi], v[lo:hi], s, u, v, lo) * (hi - lo) / 12 for lo, hi in zip(bounds, bounds[1:]))
    assert torch.allclose(clip_parts, clip_loss(u, v, s))


def test_bad_feature_shapes():
    with pytest.raises(ValueError, match="image_features"):
        RankCLIPLoss()(torch.randn(4, 3), torch.randn(4, 5), 10.0)


# --- a real two-process run (gloo) ----------------------------------------------------------------

def _worker(rank, world_size, port, result_queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        u, v = unit(8, 4, seed=15)
        rows = slice(rank * 4, rank * 4 + 4)
        out = {}
        for loss_cls in (RankCLIPLoss, CyCLIPLoss):
            for with_grad in (True, False):
                lu, lv = u[rows].clone().requires_grad_(), v[rows].clone().requires_grad_()
                loss = loss_cls(local_loss=True, gather_with_grad=with_grad, rank=rank, world_size=world_size)
                terms = loss(lu, lv, 20.0)
                terms["total"].backward()
                full = loss_cls(local_loss=False, gather_with_grad=with_grad, rank=rank, world_size=world_size)
                # gradients travel as NumPy arrays: pickled by value, they do not depend on this process
                # staying alive to share its memory, as torch tensors in a queue would
                out[loss_cls.__name__, with_grad] = ({k: t.item() for k, t in terms.items()}, lu.grad.numpy(),
                                                     lv.grad.numpy(), full(u[rows], v[rows], 20.0)["total"].item())
        result_queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_process_local_loss_and_gradients():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs: p.start()
    results, deadline = {}, time.monotonic() + 120
    while len(results) < 2 and time.monotonic() < deadline:
        assert not any(p.exitcode for p in procs), "a worker failed: see its traceback above"
        try:
            rank, out = queue.get(timeout=1)
            results[rank] = out
        except queue_module.Empty:
            pass
    for p in procs: p.join(timeout=60)
    assert len(results) == 2 and all(p.exitcode == 0 for p in procs)
    u, v = unit(8, 4, seed=15)
    for loss_cls in (RankCLIPLoss, CyCLIPLoss):
        gu, gv = u.clone().requires_grad_(), v.clone().requires_grad_()
        whole = loss_cls()(gu, gv, 20.0)
        whole["total"].backward()
        for with_grad in (True, False):
            r0, r1 = results[0][loss_cls.__name__, with_grad], results[1][loss_cls.__name__, with_grad]
            for k, t in whole.items():  # equal local batches: the mean of the local terms is the global term
                assert (r0[0][k] + r1[0][k]) / 2 == pytest.approx(t.item(), rel=1e-10), k
            assert r0[3] == pytest.approx(whole["total"].item(), rel=1e-10)  # local_loss=False: the whole loss
            if with_grad:  # all_gather with gradient: each rank's features get d(sum of local losses) = 2 * d(global)
                assert torch.allclose(torch.from_numpy(np.concatenate([r0[1], r1[1]])), 2 * gu.grad)
                assert torch.allclose(torch.from_numpy(np.concatenate([r0[2], r1[2]])), 2 * gv.grad)
            else:  # gathered copies are constants: only the local loss reaches the local features
                assert not torch.allclose(torch.from_numpy(np.concatenate([r0[1], r1[1]])), 2 * gu.grad)
