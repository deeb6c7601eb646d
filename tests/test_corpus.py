"""Training from a corpus on disk (rankclip.loading): tar shards and a CSV table made by `make_corpus`, decoded in
DataLoader workers; resume after SIGKILL, DDP with workers, bad samples at scale, and the error messages. First, the
readers by index on bad input built here in tmp_path: shards cut short or missing, bad samples, bad table rows."""
import io, json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rankclip.formats import CsvImageText, ImageError, SampleError, Skipped, write_shard
from rankclip.loading import CorpusPairs, ShardCorpus, TableCorpus, load_batches, skips_report, tally_skips
from test_train import ENV, final_params, finish, kill_after_checkpoint, params_file, run_train


def shards(root) -> str:
    return str(Path(root) / "shards" / "{00000..00003}.tar")


def small(out, data, **kw):
    "A small configuration on the corpus; image_size 32 from its 64 px JPEGs."
    base = dict(out_dir=str(out), data=data, image_encoder="resnet18", text_encoder="clip-2x128", embed_dim=64,
                image_size=32, batch_size=32, epochs=2, warmup_steps=2, threads=1, log_every=2,
                checkpoint_every=1000, progress=False)
    return {**base, **kw}


def env(tmp_path):
    return {**ENV, "RANKCLIP_CACHE": str(tmp_path / "cache")}


# --- reading by index: bad input ------------------------------------------------------------------

def encoded(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png(colour):
    return encoded(Image.new("RGB", (6, 6), colour), "PNG")


def make_shards(folder, n_shards, per_shard):
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        write_shard(folder / f"shard-{s:05d}.tar",
                    [(f"{s:05d}{i:04d}", {"jpg": encoded(Image.new("RGB", (6, 6), "red"), "JPEG"),
                                          "txt": f"sample {s}-{i}".encode(), "json": b'{"status": "success"}'})
                     for i in range(per_shard)])
    return str(folder / ("shard-{00000..%05d}.tar" % (n_shards - 1)))


def test_shard_reads_members_and_tolerates_json(tmp_path):
    write_shard(tmp_path / "s.tar", [("a/001", {"json": b"{}", "png": png("blue"), "txt": b"blue"}),
                                     ("a/002", {"webp": encoded(Image.new("RGB", (6, 6), "green"), "WEBP", lossless=True), "txt": b"green"})])
    corpus = ShardCorpus(tmp_path / "s.tar")
    assert corpus.captions() == ["blue", "green"] and corpus.where(1) == f"{tmp_path / 's.tar'}: a/002"
    np.testing.assert_allclose(np.asarray(corpus.read(0)[0])[0, 0], [0, 0, 255])
    np.testing.assert_allclose(np.asarray(corpus.read(1)[0])[0, 0], [0, 128, 0])


def test_shard_bad_samples_are_named_or_skipped_and_counted(tmp_path):
    s = tmp_path / "s.tar"
    write_shard(s, [("000", {"txt": b"no picture"}), ("001", {"jpg": png("red"), "json": b"{}"}),
                    ("002", {"png": png("red"), "txt": b" "}), ("003", {"png": png("red"), "txt": b"red"})])
    with pytest.raises(SampleError) as e:
        ShardCorpus(s)
    assert f"{s}: 000: missing image" in str(e.value) and f"{s}: 001: missing text" in str(e.value)
    corpus = ShardCorpus(s, on_error="skip")
    assert corpus.problems == [Skipped("missing image", f"{s}: 000"), Skipped("missing text", f"{s}: 001")]
    with pytest.raises(SampleError, match=r"s\.tar: 002\.txt: empty caption"):
        corpus.read(0)
    batch = CorpusPairs(corpus, list, 6, on_error="skip").batch([0, 1])
    n = len(batch.skipped)  # a seeded substitute may draw the bad sample again
    assert batch.tokens == ["red", "red"] and n >= 1 and set(batch.skipped) == {Skipped("empty caption", f"{s}: 002.txt")}
    report = skips_report(tally_skips(tally_skips({}, corpus.problems), batch.skipped))
    assert report.startswith(f"skipped {n + 2} samples: ") and f"{n} empty caption ({s}: 002.txt" in report
    assert f"1 missing image ({s}: 000)" in report and f"1 missing text ({s}: 001)" in report


def test_shard_corrupt_image_names_member(tmp_path):
    write_shard(tmp_path / "s.tar", [("007", {"jpg": b"\xff\xd8\xff garbage", "txt": b"x"})])
    with pytest.raises(ImageError, match=r"s\.tar: 007\.jpg: corrupt image"):
        ShardCorpus(tmp_path / "s.tar").read(0)


def test_truncated_shard(tmp_path):
    write_shard(tmp_path / "s.tar", [(f"{i:03d}", {"png": png("red"), "txt": b"red"}) for i in range(4)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 512 * 3 + 100])  # in the padding after 000.txt's data, before the next header
    with pytest.raises(SampleError, match=r"cut\.tar \(it ends inside the header after 000\.txt; it held 1 complete samples\): "
                                          r"truncated shard"):
        ShardCorpus(tmp_path / "cut.tar")
    corpus = ShardCorpus(tmp_path / "cut.tar", on_error="skip")
    assert corpus.captions() == ["red"] and [p.reason for p in corpus.problems] == ["truncated shard"]
    (tmp_path / "cut.tar").write_bytes(data[: 512 * 5 + 100])  # after 001.png, before its .txt: 001 is not whole
    corpus = ShardCorpus(tmp_path / "cut.tar", on_error="skip")
    assert corpus.keys == ["000"] and "it ends inside the header after 001.png; it held 1 complete" in corpus.problems[0].where


def test_ten_sample_shard_cut_at_55_percent_is_reported_as_truncated(tmp_path):
    # The case of the issue: an interrupted copy of a 10-sample shard read as "006: missing text".
    write_shard(tmp_path / "s.tar", [(f"{i:03d}", {"jpg": png("red"), "txt": b"red", "json": b"{}"}) for i in range(10)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: int(len(data) * 0.55)])
    with pytest.raises(SampleError) as e:
        ShardCorpus(tmp_path / "cut.tar")
    assert f"{tmp_path / 'cut.tar'} (it ends" in str(e.value) and "truncated shard" in str(e.value)
    assert "missing text" not in str(e.value)
    held = int(str(e.value).split("it held ")[1].split()[0])
    corpus = ShardCorpus(tmp_path / "cut.tar", on_error="skip")
    assert len(corpus) == held and 0 < held < 10
    assert [p.reason for p in corpus.problems] == ["truncated shard"] and corpus.problems[0].where.startswith(str(tmp_path / "cut.tar"))


def test_missing_shard_in_a_brace_pattern_is_named(tmp_path):
    write_shard(tmp_path / "shard-00000.tar", [("0", {"png": png("red"), "txt": b"x"})])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards not found: .*shard-00001\.tar"):
        ShardCorpus(str(tmp_path / "shard-{00000..00001}.tar"))


def test_two_ranks_with_two_workers_read_every_sample_once(tmp_path):
    from rankclip.train import GlobalBatchSampler
    pairs = CorpusPairs(ShardCorpus(make_shards(tmp_path / "shards", n_shards=6, per_shard=3)), list, 6)
    seen = []
    for rank in range(2):
        index_batches = list(GlobalBatchSampler(len(pairs), 6, seed=1, rank=rank, world_size=2).epoch(0))
        seen += [c for b in load_batches(pairs, index_batches, epoch=0, workers=2) for c in b.tokens]
    assert sorted(seen) == sorted(f"sample {s}-{i}" for s in range(6) for i in range(3))


def test_table_skip_mode_with_workers_counts_and_reports(tmp_path):
    # Two bad rows found when the table opens, a corrupt image when a worker decodes it: all skipped, counted, named.
    for i, colour in enumerate(["red", "green", "blue"]):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    rows = [(f"images/{i % 3}.png", f"caption {i}") for i in range(12)]
    rows[2], rows[5], rows[9] = ("images/0.png", ""), ("images/missing.png", "lost"), ("images/bad.png", "broken")
    f = tmp_path / "train.tsv"
    f.write_text("\n".join(["filepath\ttitle"] + ["\t".join(r) for r in rows]) + "\n", encoding="utf-8")
    corpus = TableCorpus(f, on_error="skip")
    assert corpus.captions() == [caption for i, (_, caption) in enumerate(rows) if i not in (2, 5)]
    batches = list(load_batches(CorpusPairs(corpus, list, 8, on_error="skip"), [range(0, 5), range(5, 10)], epoch=0, workers=2))
    assert [b.images.shape for b in batches] == [(5, 8, 8, 3)] * 2 and batches[0].tokens == corpus.captions()[:5]
    assert [s.reason for b in batches for s in b.skipped] == ["corrupt image"]
    report = skips_report(tally_skips(tally_skips({}, corpus.problems), (s for b in batches for s in b.skipped)))
    assert report.startswith("skipped 3 samples: ")
    assert f"1 empty caption ({f} line 4)" in report and f"1 missing image file ({f} line 7 (" in report
    assert f"1 corrupt image ({f} line 11 (" in report and "bad.png" in report


def test_make_corpus_layouts_agree(corpus_root):
    info = json.loads((corpus_root / "corpus.json").read_text())
    assert info["samples"] == 256 and info["shards"] == 4
    corpus = ShardCorpus(shards(corpus_root))
    table = CsvImageText(corpus_root / "table.csv")
    assert len(corpus) == len(table) == 256
    for k in (0, 77, 255):
        (a, cap_a), (b, cap_b) = corpus.read(k), table[k]
        assert cap_a == cap_b and cap_a.strip()
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (64, 64)
    assert corpus.captions() == TableCorpus(corpus_root / "table.csv").captions()
    sources = {json.loads(m)["source"] for m in _members(corpus_root / "shards" / "00000.tar", ".json")}
    assert sources == {"openmoji", "tuxpaint"}


def _members(shard, suffix):
    import tarfile
    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(suffix)]


def test_resume_after_sigkill_on_shards_with_workers_is_bit_identical(tmp_path, corpus_root):
    # The reference decodes in the training process; the interrupted run in two workers, with a chunk-wise
    # shuffle (chunks of 16 samples) and augmentation: the resumed run must end with the same parameters.
    kw = dict(shuffle_chunk=16, augment=True)
    ref = small(tmp_path / "ref", shards(corpus_root), workers=0, **kw)
    finish(run_train(ref, env=env(tmp_path)))
    cut = small(tmp_path / "cut", shards(corpus_root), workers=2, checkpoint_every=2, **kw)
    ckpts = Path(cut["out_dir"]) / "checkpoints"
    killed_at = kill_after_checkpoint(run_train(cut, env=env(tmp_path)), ckpts, 10)  # 8 steps per epoch: in epoch 1
    assert 10 <= killed_at < 16, killed_at
    out = finish(run_train(cut, env=env(tmp_path)))
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 16
    a, b = final_params(ref["out_dir"]), final_params(cut["out_dir"])
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_ddp_two_ranks_with_workers_equal_one_process_on_shards(tmp_path, corpus_root):
    # As test_train's DDP test (LayerNorm image tower, eps 1e-6), on the shards, each rank decoding in a worker.
    kw = dict(image_encoder="convnext_atto", loss="rankclip", epochs=1, batch_size=64, lr=1e-3, eps=1e-6)
    one = small(tmp_path / "one", shards(corpus_root), workers=0, **kw)
    two = small(tmp_path / "two", shards(corpus_root), workers=1, **kw)
    finish(run_train(one, env=env(tmp_path)))
    finish(run_train(two, nproc=2, env=env(tmp_path)))
    a, b = final_params(one["out_dir"]), final_params(two["out_dir"])
    # Round-off of the two-rank gradient sum reaches 1.1e-5 on one of 6.3 million token embeddings here; a batch
    # that differed would move parameters by about lr = 1e-3 a step.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=5e-5, msg=lambda m: f"{k}: {m}")


def broken_copy(corpus_root, dest: Path) -> str:
    "The corpus's shards with a corrupt JPEG and a caption of spaces in the middle of shard 1, and shard 3 cut at 55%."
    import tarfile
    dest.mkdir()
    for s in range(4):
        with tarfile.open(corpus_root / "shards" / f"{s:05d}.tar") as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        samples = {}
        for name, data in members:
            key, _, ext = name.partition(".")
            samples.setdefault(key, {})[ext] = data
        keys = list(samples)
        if s == 1:
            samples[keys[20]]["jpg"] = samples[keys[20]]["jpg"][:200]  # a truncated JPEG
            samples[keys[40]]["txt"] = b"   "
        write_shard(dest / f"{s:05d}.tar", list(samples.items()))
    raw = (dest / "00003.tar").read_bytes()
    (dest / "00003.tar").write_bytes(raw[: int(len(raw) * 0.55)])
    return str(dest / "{00000..00003}.tar")


def test_bad_samples_at_scale_two_ranks_skip_count_and_finish(tmp_path, corpus_root):
    data = broken_copy(corpus_root, tmp_path / "broken")
    cfg = small(tmp_path / "run", data, workers=1, on_error="skip", epochs=2, batch_size=32)
    out = finish(run_train(cfg, nproc=2, env=env(tmp_path)), timeout=600)
    summary = json.loads(out.strip().splitlines()[-1])
    corpus = ShardCorpus(data, on_error="skip")
    assert summary["steps"] == 2 * (len(corpus) // 32)  # every rank ran every step
    assert "truncated shard" in summary["skips"] and "00003.tar" in summary["skips"]
    run = json.loads((Path(cfg["out_dir"]) / "run.json").read_text())["summary"]
    assert run["skipped_samples"] == summary["skipped_samples"] >= 1
    # the corrupt JPEG and the empty caption are read in each epoch they are drawn: counted, named
    if "corrupt image" in summary["skips"]:
        assert "00001.tar: " in summary["skips"]


def cli_train(cfg: dict, capsys) -> tuple[int, str]:
    "`rankclip train` in this process on the params file of `cfg`: its return code and what it printed."
    from rankclip.cli import main
    code = main(["train", "--params", str(params_file(cfg))])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_bad_sample_raises_one_line_through_a_worker(tmp_path, corpus_root, capsys):
    data = broken_copy(corpus_root, tmp_path / "broken")
    good = str(Path(data).parent / "{00000..00002}.tar")  # without the truncated shard: opens, fails when decoding
    code, out = cli_train(small(tmp_path / "run", good, workers=2, epochs=2), capsys)
    last = out.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in out and "00001.tar: " in last, out[-3000:]
    assert "corrupt image" in last or "empty caption" in last, last


def test_truncated_or_missing_shard_is_named(tmp_path, corpus_root, capsys):
    data = broken_copy(corpus_root, tmp_path / "broken")
    for spec, expect in ((data, "00003.tar (it ends"), (str(tmp_path / "nowhere/{00000..00001}.tar"), "2 of 2 shards not found")):
        code, out = cli_train(small(tmp_path / "run", spec), capsys)
        assert code == 1 and expect in out and "Traceback" not in out, out[-3000:]


def test_table_with_workers_trains_as_the_shards_do(tmp_path, corpus_root):
    # The table and the shards hold the same samples in the same order: with a full shuffle, the same run.
    from rankclip.config import TrainConfig
    from rankclip.train import fit
    a = small(tmp_path / "table", str(corpus_root / "table.csv"), workers=2, epochs=1, max_steps=3)
    b = small(tmp_path / "shards", shards(corpus_root), workers=0, epochs=1, max_steps=3, shuffle_chunk=0)
    fit(TrainConfig(**a))
    fit(TrainConfig(**b))
    pa, pb = final_params(a["out_dir"]), final_params(b["out_dir"])
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
