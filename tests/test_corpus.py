"""Training from a corpus on disk (rankclip.loading): tar shards and a CSV table made by `make_corpus`, decoded in
DataLoader workers; resume after SIGKILL, DDP with workers, bad samples at scale, and the error messages."""
import json
from pathlib import Path

import numpy as np
import torch

from rankclip.formats import CsvImageText, ShardImageText, write_shard
from rankclip.loading import ShardCorpus, TableCorpus
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


def test_make_corpus_layouts_agree(corpus_root):
    info = json.loads((corpus_root / "corpus.json").read_text())
    assert info["samples"] == 256 and info["shards"] == 4
    streamed = list(ShardImageText(shards(corpus_root)))
    table = CsvImageText(corpus_root / "table.csv")
    assert len(streamed) == len(table) == 256
    for k in (0, 77, 255):
        (a, cap_a), (b, cap_b) = streamed[k], table[k]
        assert cap_a == cap_b and cap_a.strip()
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (64, 64)
    corpus = ShardCorpus(shards(corpus_root))
    assert corpus.captions() == [c for _, c in streamed] == TableCorpus(corpus_root / "table.csv").captions()
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
