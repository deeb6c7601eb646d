"""Data sources: counts on the real fetched data, fetch idempotency and hash checks (offline), clear
errors for a missing data folder, DVC hashing, and the prepare -> load_prepared round trip."""
import io, json, os, subprocess, sys, tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import rankclip.data as rd
import rankclip.fetch as rf
from rankclip.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def data():
    try: rf.data_dir(DATA)
    except rd.DataError as e: pytest.fail(f"{e} (`make test` does this before pytest)")
    return DATA


@pytest.fixture(scope="session")
def emoji(data): return rd.emoji_catalogue(data)


def _raw(path): return json.loads(Path(path).read_text())


# Counts, from DATA.md, on the real data

def test_emoji_counts(emoji):
    vendors = emoji.label_names["vendor"]
    counts = {v: int((emoji.labels["vendor"] == i).sum()) for i, v in enumerate(vendors)}
    assert counts == {"apple": 3778, "google": 3781, "twitter": 3781, "facebook": 3640}
    assert len(emoji) == 14980 and len(emoji.captions) == 14980
    assert len(np.unique(emoji.labels["emoji"])) == 1906
    assert "Component" not in emoji.label_names["category"] and len(emoji.label_names["category"]) == 9


def test_other_counts(data):
    om = rd.openmoji_catalogue(data)
    assert len(om) >= 3900 and len(om.captions) == len(om)
    fm = rd.fashion_catalogue(data)
    assert np.bincount(fm.labels["split"]).tolist() == [60000, 10000]
    assert fm.label_names["class"][0] == "T-shirt/top" and fm.label_names["class"][9] == "Ankle boot"
    assert sorted(np.unique(fm.labels["class"])) == list(range(10)) and fm.captions is None
    tp = rd.tuxpaint_catalogue(data)
    assert len(tp) >= 900 and all(c.strip() for c in tp.captions)


def test_emoji_labels_match_emoji_json(data, emoji):
    "Every drawing's labels agree with its emoji.json entry, looked up independently by sheet position."
    by_pos = {}
    for e in _raw(data / "emoji/emoji.json"):
        for v in [e, *(e.get("skin_variations") or {}).values()]:
            by_pos[(v["sheet_x"], v["sheet_y"])] = (e, v)
    names = emoji.label_names
    for k in range(0, len(emoji), 97):
        sheet, x, y = emoji.refs[k]
        e, v = by_pos[(x, y)]
        vendor = names["vendor"][emoji.labels["vendor"][k]]
        assert f"/img/{vendor}/" in sheet and v[f"has_img_{vendor}"]
        assert names["category"][emoji.labels["category"][k]] == e["category"]
        assert names["subcategory"][emoji.labels["subcategory"][k]] == e["subcategory"]
        assert names["emoji"][emoji.labels["emoji"][k]] == e["unified"]
        assert emoji.captions[k].startswith(e["name"].lower())


def test_no_label_string_in_captions(data, emoji):
    "Category/subcategory strings (the real ones, from both packages) appear in no caption's tags, compound ones nowhere."
    em, om = _raw(data / "emoji/emoji.json"), _raw(data / "openmoji/data/openmoji.json")
    strings = {e[k] for e in em for k in ("category", "subcategory")} | {e[k] for e in om for k in ("group", "subgroups")
                                                                          if e["group"] not in rd.OPENMOJI_SKIP}
    assert {"Smileys & Emotion", "People & Body", "face-smiling", "arts & crafts"} <= strings
    import re
    def has(text, s): return re.search(rf"(?<![\w-]){re.escape(s.lower())}(?![\w-])", text.lower())
    for c in set(emoji.captions):
        name, _, tags = c.partition("; ")
        assert not any(has(tags, s) for s in strings), c
        assert not any(has(c, s) for s in strings if not s.isalpha()), c


def test_emoji_crop_matches_pil(data, emoji):
    "decode_emoji against PIL's own crop and alpha compositing onto white."
    idx = [0, 1234, 7777, 14979]
    got = rd.decode_emoji([emoji.refs[i] for i in idx])
    for g, i in zip(got, idx):
        sheet, x, y = emoji.refs[i]
        crop = Image.open(sheet).convert("RGBA").crop((x * 34 + 1, y * 34 + 1, x * 34 + 33, y * 34 + 33))
        want = np.asarray(Image.alpha_composite(Image.new("RGBA", crop.size, "white"), crop).convert("RGB"))
        assert np.abs(g.astype(int) - want).max() <= 1


def test_fashion_idx_matches_reader(data):
    "read_idx against a direct numpy read of the gzipped IDX bytes."
    import gzip
    raw = gzip.open(data / "fashion_mnist/t10k-images-idx3-ubyte.gz").read()
    want = np.frombuffer(raw[16:], np.uint8).reshape(10000, 28, 28)
    assert (rd.read_idx(str(data / "fashion_mnist/t10k-images-idx3-ubyte.gz")) == want).all()


# Fetching: idempotent, offline on a second call, hash mismatch named

def test_second_fetch_is_offline(data):
    "With npm and apt-get off PATH, fetch-data still succeeds: it reports every source up to date."
    env = {**os.environ, "PATH": str(BIN)}
    r = subprocess.run([str(BIN / "rankclip"), "fetch-data"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for s in rf.SOURCES: assert f"{s}: up to date" in r.stdout


def _fake_npm(tmp_path, files: dict) -> Path:
    path = tmp_path / "fake-1.0.0.tgz"
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            b = text.encode(); info = tarfile.TarInfo(name); info.size = len(b)
            t.addfile(info, io.BytesIO(b))
    return path


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    "A pinned npm source 'fake' whose download is a local archive (no network)."
    archive = _fake_npm(tmp_path, {"package/a.json": "{}", "package/img/x/1.png": "png", "package/LICENSE": "MIT"})
    spec = dict(kind="npm", package="fake", version="1.0.0", root="package", sha256=sha256_file(archive),
                keep=["package/a.json", "package/img/*/1.png", "package/LICENSE"], licence="MIT")
    monkeypatch.setitem(rf.SOURCES, "fake", spec)
    calls = []
    def download(name, spec, dest):
        calls.append(name)
        out = Path(dest) / archive.name
        out.write_bytes(archive.read_bytes())
        return out
    monkeypatch.setattr(rf, "download_archive", download)
    return spec, calls


def test_fetch_then_up_to_date(tmp_path, fake_source):
    spec, calls = fake_source
    root = tmp_path / "data"
    assert rf.fetch_source("fake", root) == "fetched"
    assert sorted(p.relative_to(root / "fake").as_posix() for p in (root / "fake").rglob("*") if p.is_file()) == \
        [".fetched.json", "LICENSE", "a.json", "img/x/1.png"]
    assert rf.fetch_source("fake", root) == "up to date" and calls == ["fake"]
    assert json.loads((root / "fake" / rf.MARKER).read_text())["sha256"] == spec["sha256"]


def test_hash_mismatch_names_source(tmp_path, fake_source, monkeypatch):
    spec, _ = fake_source
    monkeypatch.setitem(spec, "sha256", "0" * 64)
    with pytest.raises(rd.DataError, match=r"^fake: .*expected 0{64}") as e:
        rf.fetch_source("fake", tmp_path / "data")
    assert sha256_file(tmp_path / "fake-1.0.0.tgz") in str(e.value)
    assert not (tmp_path / "data" / "fake").exists()


def test_pinned_version_changed_refetches(tmp_path, fake_source, monkeypatch):
    spec, calls = fake_source
    root = tmp_path / "data"
    rf.fetch_source("fake", root)
    monkeypatch.setitem(spec, "version", "1.0.1")
    assert not rf.is_fetched("fake", root) and rf.fetch_source("fake", root) == "fetched" and len(calls) == 2


# Errors for a missing or incomplete data folder

def test_missing_data_folder(tmp_path):
    for bad in (tmp_path / "absent", tmp_path / "file"):
        if bad.name == "file": bad.write_text("")
        with pytest.raises(rd.DataError, match=r"rankclip fetch-data") as e: rd.emoji_catalogue(bad)
        assert str(bad) in str(e.value)
    (tmp_path / "d" / "emoji").mkdir(parents=True)
    with pytest.raises(rd.DataError, match=r"d/emoji/: missing, incomplete"): rf.data_dir(tmp_path / "d", "emoji")


def test_cli_missing_data_is_one_line(tmp_path):
    r = subprocess.run([str(BIN / "rankclip"), "prepare", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "p")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "nodata") in r.stderr and "rankclip fetch-data" in r.stderr


# DVC: the folder hash is DVC's own

def test_dvc_dir_hash_matches_dvc(tmp_path):
    d = tmp_path / "repo"; (d / "data" / "sub").mkdir(parents=True)
    (d / "data" / "b.txt").write_text("b\r\nline\n"); (d / "data" / "sub" / "a.bin").write_bytes(bytes(range(256)))
    (d / "data" / ".hidden").write_text("h")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=d, check=True)
    subprocess.run(dvc + ["add", "-q", "data"], cwd=d, check=True)
    out = yaml.safe_load((d / "data.dvc").read_text())["outs"][0]
    assert rf.dvc_dir_hash(d / "data") == (out["md5"], out["size"], out["nfiles"])
    (d / "data" / "b.txt").write_text("changed")
    import shutil; shutil.rmtree(d / ".dvc" / "cache")
    with pytest.raises(rd.DataError, match=r"data/: content hash .* differs from .*data.dvc"):
        rf.verify_dvc(d / "data", d / "data.dvc")


def test_data_dvc_matches_fetched(data):
    out = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert rf.dvc_dir_hash(data)[0] == out["md5"]


def test_dvc_stage_prepare():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    assert stage["cmd"] == "rankclip prepare" and "prepared" in stage["outs"]
    assert {"data", "rankclip/data.py"} <= set(stage["deps"]) and "data" in stage["params"]
    assert isinstance(yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["image_size"], int)


# prepare -> load_prepared

def test_prepare_round_trip(data, emoji, tmp_path):
    out = tmp_path / "prepared"
    r = subprocess.run([str(BIN / "rankclip"), "prepare", "--data", str(data), "--out", str(out),
                        "--source", "emoji", "--source", "fashion_mnist", "--source", "tuxpaint"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ps = rd.load_prepared("emoji", out)
    assert isinstance(ps.images, np.memmap) and ps.images.shape == (14980, 32, 32, 3) and ps.images.dtype == np.uint8
    assert ps.captions == emoji.captions and ps.info["version"] == "16.0.0"
    for k in emoji.labels: assert (ps.labels[k] == emoji.labels[k]).all() and ps.label_names[k] == emoji.label_names[k]
    assert (ps.images[[3, 9000]] == rd.decode_emoji([emoji.refs[3], emoji.refs[9000]])).all()
    fm = rd.load_prepared("fashion_mnist", out)
    assert fm.images.shape == (70000, 28, 28, 1) and fm.captions is None
    assert (fm.images[60000, ..., 0] == rd.read_idx(str(data / "fashion_mnist/t10k-images-idx3-ubyte.gz"))[0]).all()
    tp = rd.load_prepared("tuxpaint", out)
    assert tp.images.shape[1:] == (32, 32, 3) and len(tp.captions) == len(tp) >= 900


def test_prepare_openmoji_pool_is_deterministic(data, tmp_path):
    a = rd.prepare(data, tmp_path / "a", 24, ["openmoji"], limit=300, workers=1)
    b = rd.prepare(data, tmp_path / "b", 24, ["openmoji"], limit=300, workers=2)
    assert a["openmoji"]["shape"] == [24, 24, 3]
    x, y = rd.load_prepared("openmoji", tmp_path / "a"), rd.load_prepared("openmoji", tmp_path / "b")
    assert (np.asarray(x.images) == np.asarray(y.images)).all() and x.captions == y.captions
    assert (np.asarray(x.images)[:, 0, 0] == 255).all()


def test_load_prepared_missing(tmp_path):
    with pytest.raises(rd.DataError, match=r"rankclip prepare"): rd.load_prepared("emoji", tmp_path)


def test_dataset_and_held_out_vendor(data, emoji, tmp_path):
    rd.prepare(data, tmp_path, sources=["emoji"], workers=1)
    ps = rd.load_prepared("emoji", tmp_path)
    train, test = rd.held_out_vendor_split(ps, "google")
    g = ps.label_names["vendor"].index("google")
    assert (ps.labels["vendor"][train] != g).all() and len(train) == 14980 - 3781
    assert (ps.labels["vendor"][test] == g).all() and len(test) == len(np.unique(ps.labels["emoji"][test]))
    none = ps.label_names["skin_tone"].index("none")
    assert (ps.labels["skin_tone"][test] == none).mean() > 0.99
    loader = torch.utils.data.DataLoader(rd.PreparedDataset(ps, "category", test), batch_size=16)
    x, captions, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and len(captions) == 16
    assert (y.numpy() == ps.labels["category"][test[:16]]).all()
    with pytest.raises(rd.DataError, match="held-out vendor 'samsung'"): rd.held_out_vendor_split(ps, "samsung")
