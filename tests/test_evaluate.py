"""rankclip.evaluate and the statistics, features and benchmarks it runs, against independent references
(scikit-learn, brute-force loops, Monte Carlo, the formulas of Liang et al. and Wang and Isola written
directly in torch), and `rankclip evaluate` end to end on a real small model with constructed prepared sources."""
import json, math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rankclip.benchmarks import zero_shot_folder
from rankclip.evaluate import evaluate_main, linear_probe, modality_gap, retrieval, zero_shot
from rankclip.features import FeatureCache, class_embeddings, image_features
from rankclip.report import report_metrics
from rankclip.stats import classification_metrics, estimate, fit_linear_probe, prompt_ensembles, random_hit_rate, weighted_mean
from rankclip.study import load_params


class KnownEncoder(torch.nn.Module):
    "Image -> table[first pixel]; text -> vocab[text]: embeddings known in advance."
    def __init__(self, table, vocab):
        super().__init__()
        self.table, self.vocab, self.config = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32)), vocab, {}

    def encode_image(self, images, normalize=True):
        return torch.nn.functional.normalize(self.table[images[:, 0, 0, 0].long()], dim=-1)

    def encode_text(self, texts, normalize=True):
        return torch.nn.functional.normalize(torch.stack([torch.as_tensor(self.vocab[t], dtype=torch.float32) for t in texts]), dim=-1)


def _images(index):
    x = np.zeros((len(index), 4, 4, 3), np.uint8)
    x[:, 0, 0, 0] = index
    return x


# --- zero-shot through a constructed encoder -----------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_shot_permutation_exact(seed):
    "Images of class c embedded as class perm[c]: accuracy is exactly the share of fixed points."
    rng = np.random.default_rng(seed)
    K, names = 20, [f"class {i}" for i in range(20)]
    templates = ["a {}.", "{}", "the {} here"]
    basis = np.linalg.qr(rng.normal(size=(32, 32)))[0][:K]
    vocab = {p: basis[c] * (1 + j) for c, ps in enumerate(prompt_ensembles(names, templates)) for j, p in enumerate(ps)}
    perm = rng.permutation(K)
    model = KnownEncoder(basis[perm], vocab)
    labels = rng.integers(0, K, 300)
    feats = image_features(model, _images(labels))
    m = zero_shot(feats, class_embeddings(model, prompt_ensembles(names, templates)), labels, n_boot=200)
    assert m["top1"]["value"] == pytest.approx(np.mean(perm[labels] == labels), abs=1e-12)
    identity = KnownEncoder(basis, vocab)
    assert zero_shot(image_features(identity, _images(labels)), class_embeddings(identity, prompt_ensembles(names, templates)),
                     labels, n_boot=10)["top1"]["value"] == 1.0


def test_classification_matches_sklearn():
    "Top-k accuracy and mean per-class recall agree with scikit-learn on random scores."
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(500, 12)), rng.integers(0, 12, 500)
    scores[np.arange(500), labels] += 1.0
    m = classification_metrics(scores, labels, (1, 3, 5), n_boot=300)
    for k in (1, 3, 5):
        assert m[f"top{k}"]["value"] == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=range(12)))
        assert m[f"top{k}"]["ci_low"] < m[f"top{k}"]["value"] < m[f"top{k}"]["ci_high"]
        assert m[f"top{k}"]["chance"] == pytest.approx(k / 12)
        assert m[f"top{k}"]["majority"] == pytest.approx(np.sort(np.bincount(labels))[::-1][:k].sum() / 500)
    assert m["mean_per_class_recall"]["value"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(1)))


def test_bootstrap_interval_covers_like_a_binomial():
    "The percentile interval of a proportion is about as wide as the normal-approximation interval."
    for p, n in ((0.5, 400), (0.9, 2000)):
        x = np.r_[np.ones(int(p * n)), np.zeros(n - int(p * n))]
        e = estimate(weighted_mean(x), n, n_boot=3000, seed=1)
        half = 1.96 * math.sqrt(p * (1 - p) / n)
        assert e["ci_low"] == pytest.approx(p - half, abs=0.25 * half) and e["ci_high"] == pytest.approx(p + half, abs=0.25 * half)


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        classification_metrics(np.zeros((2, 3)), [0, 3])


# --- retrieval -----------------------------------------------------------------------------------------

def _brute_recall(sims, relevant, k):
    "Recall@k by sorting each row, ties against the query (irrelevant items first among equals)."
    hits = []
    for s, r in zip(sims, relevant):
        order = np.lexsort((r, -s))  # by score descending, irrelevant before relevant on ties
        hits.append(r[order[:k]].any())
    return float(np.mean(hits))


def test_retrieval_several_captions_matches_brute_force():
    "Random embeddings, 3 to 5 captions per image, some images sharing captions: agrees with sorting."
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 16)); img /= np.linalg.norm(img, axis=1, keepdims=True)
    owner = np.concatenate([np.full(rng.integers(3, 6), i) for i in range(40)])
    txt = img[owner] + 0.9 * rng.normal(size=(len(owner), 16)); txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    rel = np.zeros((40, len(owner)), bool); rel[owner, np.arange(len(owner))] = True
    rel[0, owner == 1] = True  # image 0 also matches image 1's captions
    r = retrieval(img, txt, rel, ks=(1, 5, 10), n_boot=100)
    sims = img @ txt.T
    for k in (1, 5, 10):
        assert r[f"image_to_text_R@{k}"]["value"] == pytest.approx(_brute_recall(sims, rel, k))
        assert r[f"text_to_image_R@{k}"]["value"] == pytest.approx(_brute_recall(sims.T, rel.T, k))
    assert r["image_to_text_R@1"]["n"] == 40 and r["text_to_image_R@1"]["n"] == len(owner)


def test_random_hit_rate_monte_carlo():
    rng = np.random.default_rng(0)
    for m, N, k in ((1, 50, 5), (3, 20, 4), (5, 8, 5)):
        sim = np.mean([(rng.permutation(N)[:k] < m).any() for _ in range(20000)])
        assert random_hit_rate([m], N, k)[0] == pytest.approx(sim, abs=0.01)


def test_retrieval_needs_a_partner_for_everyone():
    with pytest.raises(ValueError, match="at least one relevant"):
        retrieval(np.eye(3), np.eye(3), np.eye(3, dtype=bool)[:, [0, 1, 1]] & np.array([[1, 1, 0]], bool).T)


# --- modality gap ---------------------------------------------------------------------------------------

def test_modality_gap_against_direct_formulas():
    "Gap (Liang et al.), alignment and uniformity (Wang and Isola) written directly in torch."
    rng = np.random.default_rng(0)
    u = rng.normal(size=(300, 8)) + 2; u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.normal(size=(300, 8)) - 1; v /= np.linalg.norm(v, axis=1, keepdims=True)
    g = modality_gap(u, v, n_boot=200)
    U, V = torch.tensor(u), torch.tensor(v)
    assert g["gap"]["value"] == pytest.approx((U.mean(0) - V.mean(0)).norm().item(), rel=1e-5)
    assert g["alignment"]["value"] == pytest.approx((U - V).norm(dim=1).pow(2).mean().item(), rel=1e-5)
    for name, X in (("image", U), ("text", V)):
        assert g[f"uniformity_{name}"]["value"] == pytest.approx(torch.pdist(X).pow(2).mul(-2).exp().mean().log().item(), rel=1e-4)
    assert g["gap"]["ci_low"] < g["gap"]["value"] < g["gap"]["ci_high"]
    sub = modality_gap(u, v, n_boot=0, max_pairs_n=100)
    assert sub["uniformity_image"]["n"] == 100 and sub["gap"]["n"] == 300


# --- linear probe ----------------------------------------------------------------------------------------

def test_linear_probe_separable_and_search_recorded():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 20))
    def draw(n):
        x = rng.normal(size=(n, 20)); return x, (x @ w.T).argmax(1)
    (xtr, ytr), (xte, yte) = draw(2000), draw(500)
    m = linear_probe(xtr, ytr, xte, yte, n_boot=200)
    assert m["top1"]["value"] > 0.95 and m["top1"]["chance"] == pytest.approx(0.2)
    probe = fit_linear_probe(xtr, ytr)
    assert [c["C"] for c in probe.info["curve"]] == sorted(c["C"] for c in probe.info["curve"])
    assert probe.info["n_train"] + probe.info["n_val"] == 2000
    noise = linear_probe(rng.normal(size=(600, 20)), rng.integers(0, 5, 600), rng.normal(size=(400, 20)), rng.integers(0, 5, 400), n_boot=200)
    assert noise["top1"]["ci_low"] < 0.2 + 0.06


def test_probe_unseen_test_class_ranks_last():
    probe = fit_linear_probe(np.r_[np.zeros((10, 2)), np.ones((10, 2))], np.r_[np.zeros(10, int), np.full(10, 2)])
    s = probe.scores(np.ones((1, 2)), 4)
    assert np.isinf(s[0, [1, 3]]).all() and s[0].argmax() == 2


# --- caching and real data ---------------------------------------------------------------------------

def test_cache_keys_on_weights_and_data(tmp_path):
    model = KnownEncoder(np.eye(3), {})
    cache = FeatureCache(tmp_path)
    a = image_features(model, _images([0, 1, 2]), cache=cache)
    image_features(model, _images([0, 1, 2]), cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    image_features(model, _images([0, 1, 1]), cache=cache)
    with torch.no_grad(): model.table[0, 1] = 5.0
    b = image_features(model, _images([0, 1, 2]), cache=cache)
    assert cache.misses == 3 and not np.allclose(a, b) and len(list(tmp_path.glob("*.npy"))) == 3


def test_zero_shot_imagefolder_with_class_map(tmp_path):
    "WordNet-id folders named through a class map; a grey and a palette PNG among the images."
    colours = {"n00000001": ("red", (230, 20, 20)), "n00000002": ("green", (20, 230, 20)), "n00000003": ("blue", (20, 20, 230))}
    for wnid, (_, rgb) in colours.items():
        d = tmp_path / "val" / wnid; d.mkdir(parents=True)
        for i in range(4): Image.new("RGB", (30 + 5 * i, 24), rgb).save(d / f"{i}.png")
        Image.new("RGB", (20, 20), rgb).convert("P").save(d / "p.png")

    class Colour(torch.nn.Module):
        def __init__(self): super().__init__(); self.config = {"image_size": 8}; self.w = torch.nn.Parameter(torch.ones(1))
        def encode_image(self, images, normalize=True): return torch.nn.functional.normalize(images.float().mean((1, 2)) * self.w, dim=-1)
        def encode_text(self, texts, normalize=True):
            return torch.stack([torch.eye(3)[[n in t for n in ("red", "green", "blue")].index(True)] for t in texts])

    class_map = {w: n for w, (n, _) in colours.items()}
    cache = FeatureCache(tmp_path / "cache")
    m, info = zero_shot_folder(Colour(), "imagenet", tmp_path, "val", class_map, n_boot=50, cache=cache)
    assert m["top1"]["value"] == 1.0 and m["top1"]["n"] == 15 and info["class_names"] == ["red", "green", "blue"]
    assert info["n_templates"] == 80
    zero_shot_folder(Colour(), "imagenet", tmp_path, "val", class_map, n_boot=50, cache=cache)
    assert cache.hits == 2


# --- `rankclip evaluate` end to end ---------------------------------------------------------------------

def _write_prepared(root: Path, name: str, images, captions, labels, label_names):
    "A prepared source in the layout rankclip.data.load_prepared reads."
    d = root / name; d.mkdir(parents=True)
    np.save(d / "images.npy", images)
    np.savez(d / "labels.npz", **labels)
    (d / "meta.json").write_text(json.dumps({"captions": captions, "label_names": label_names, "info": {"source": name}}))


def _tiny_prepared(root: Path, rng):
    n_emoji, vendors = 30, ["apple", "google", "twitter", "facebook"]
    words = ["cat", "dog", "sun", "moon", "car", "tree", "fish", "star", "cup", "hat"]
    names = [f"{words[i % 10]} {words[(i // 10) % 10]} {i}" for i in range(n_emoji)]
    cat, sub = np.arange(n_emoji) % 3, np.arange(n_emoji) % 6
    emo = np.repeat(np.arange(n_emoji), 4); vend = np.tile(np.arange(4), n_emoji)
    pics = lambda n, c=3, s=32: rng.integers(0, 256, (n, s, s, c), dtype=np.uint8)
    _write_prepared(root, "emoji", pics(len(emo)), [f"{names[e]}; tag" for e in emo],
                    {"vendor": vend, "emoji": emo, "category": cat[emo], "subcategory": sub[emo], "skin_tone": np.zeros_like(emo)},
                    {"vendor": vendors, "emoji": [f"E{i}" for i in range(n_emoji)], "category": ["a", "b", "c"],
                     "subcategory": [f"s{i}" for i in range(6)], "skin_tone": ["none"]})
    om = np.repeat(np.arange(n_emoji), 2)
    _write_prepared(root, "openmoji", pics(len(om)), [f"{names[e]}; x" for e in om],
                    {"emoji": om, "category": cat[om], "subcategory": sub[om], "skin_tone": np.zeros_like(om)},
                    {"emoji": [f"E{i}" for i in range(n_emoji)], "category": ["a", "b", "c"],
                     "subcategory": [f"s{i}" for i in range(6)], "skin_tone": ["none"]})
    fy = np.arange(10).repeat(12)
    _write_prepared(root, "fashion_mnist", pics(120, 1, 28), None, {"class": fy, "split": np.arange(120) % 2},
                    {"class": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
                     "split": ["train", "test"]})
    _write_prepared(root, "tuxpaint", pics(20), [f"A {words[i % 7]}." for i in range(20)], {"theme": np.zeros(20, int)}, {"theme": ["t"]})


def test_evaluate_main_end_to_end(tmp_path, capsys):
    "A real resnet18/clip-2x128 model folder, constructed prepared sources, an ImageFolder: the files and schema."
    from rankclip.models import create_model
    rng = np.random.default_rng(0)
    _tiny_prepared(tmp_path / "prepared", rng)
    for c in ("red", "blue"):
        d = tmp_path / "folder" / c; d.mkdir(parents=True)
        for i in range(3): Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    torch.manual_seed(0)
    create_model("resnet18", "clip-2x128", embed_dim=32, image_size=32).save(tmp_path / "run" / "model")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": {"train_vendors": ["apple", "google", "facebook"]}}))
    argv = [str(tmp_path / "run" / "model"), "--prepared", str(tmp_path / "prepared"), "--cache-dir", str(tmp_path / "cache"),
            "--n-boot", "50", "--fashion-train", "40", "--few-shots", "1", "2", "--zero-shot", f"imagefolder={tmp_path / 'folder'}"]
    metrics = evaluate_main(argv)
    out = tmp_path / "run" / "eval"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    probes = ["openmoji.linear_probe.subcategory", "openmoji.few_shot.shots1", "openmoji.few_shot.shots2", "fashion_mnist.linear_probe",
              "cross_style.linear_probe.vendor", "cross_style.linear_probe.openmoji", "cross_style.few_shot.vendor_emoji",
              "cross_style.few_shot.openmoji_emoji"]
    expected = {f"heldout_vendor.zero_shot.{l}" for l in ("emoji", "category", "subcategory")} \
        | {"heldout_vendor.modality_gap", "heldout_vendor.rank_consistency"} \
        | {f"openmoji.zero_shot.{l}" for l in ("emoji", "category", "subcategory")} | {"fashion_mnist.zero_shot"} \
        | {f"{p}{s}" for p in probes for s in ("", ".embedding", ".pixels", ".random_encoder")} \
        | {"tuxpaint.retrieval", "tuxpaint.modality_gap", "tuxpaint.rank_consistency", "imagefolder.zero_shot"}
    assert set(on_disk) == expected
    listed = {r for _, r, _ in report_metrics(load_params(Path(__file__).parents[1] / "params.yaml"))}
    assert {r.replace("shots16", "shots2").replace("shots4", "shots2") for r in listed} <= expected
    for bench, ms in on_disk.items():
        for metric, e in ms.items():
            assert set(e) == {"value", "ci_low", "ci_high", "n", "chance", "majority"}, (bench, metric)
            if metric == "top1" or "R@" in metric: assert e["ci_low"] <= e["value"] <= e["ci_high"], (bench, metric, e)
            if "zero_shot" in bench or "linear_probe" in bench: assert e["chance"] is not None and e["majority"] is not None
    assert on_disk["heldout_vendor.zero_shot.emoji"]["top1"]["n"] == 30
    assert on_disk["heldout_vendor.zero_shot.emoji"]["top1"]["chance"] == pytest.approx(1 / 30)
    assert on_disk["tuxpaint.retrieval"]["text_to_image_R@1"]["n"] == 7
    run = json.loads((out / "details" / "_run.json").read_text())
    assert run["held_out_vendor"] == "twitter" and run["cache"]["misses"] > 0
    probe = json.loads((out / "details" / "fashion_mnist.linear_probe.json").read_text())
    assert probe["probe"]["C"] in [c["C"] for c in probe["probe"]["curve"]] and probe["n_train"] == 40
    assert "heldout_vendor.zero_shot.emoji: top1" in capsys.readouterr().out
    again = evaluate_main(argv + ["--benchmark", "tuxpaint"])
    assert json.loads((out / "details" / "_run.json").read_text())["cache"]["misses"] == 0
    assert again["tuxpaint.retrieval"] == metrics["tuxpaint.retrieval"]


def test_evaluate_missing_prepared_names_the_fix(tmp_path):
    from rankclip.data import DataError
    from rankclip.models import create_model
    create_model("resnet18", "clip-2x128", embed_dim=16, image_size=32).save(tmp_path / "model")
    with pytest.raises(DataError, match="rankclip prepare"):
        evaluate_main([str(tmp_path / "model"), "--prepared", str(tmp_path / "nothing"), "--benchmark", "tuxpaint"])
