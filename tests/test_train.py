"""The training loop in real subprocesses: resume after SIGKILL, DDP equivalence, non-finite losses,
corrupt checkpoints, and real learning on the embedded data."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rankclip.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from rankclip.config import ConfigError, TrainConfig
from rankclip.train import NonFiniteLossError, fit

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny(out, prepared_root, **kw):
    "A small, fast configuration on a real subset of the emoji drawings."
    base = dict(out_dir=str(out), image_encoder="resnet18", text_encoder="clip-2x128", embed_dim=64, image_size=32,
                data_root=str(prepared_root), limit=512, batch_size=64, epochs=2, warmup_steps=2,
                threads=1, log_every=2, checkpoint_every=1000, progress=False)
    return {**base, **kw}


def params_file(cfg: dict) -> Path:
    "A params file whose `train` section is `cfg`, beside the run's output folder."
    p = Path(cfg["out_dir"] + ".params.yaml")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump({"train": cfg}))
    return p


def run_train(cfg: dict, nproc: int = 1, **popen):
    "Start `rankclip train` (under torchrun when nproc > 1) as a subprocess."
    cmd = [str(BIN / "rankclip"), "train", "--params", str(params_file(cfg))]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--no-python", *cmd]
    return subprocess.Popen(cmd, **{"env": ENV, **popen}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p, timeout=600):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def final_params(out) -> dict:
    return load_file(Path(out) / "model" / "model.safetensors")


def kill_after_checkpoint(p, ckpts: Path, step: int, timeout: float = 300) -> int:
    "SIGKILL the training process `p` once a checkpoint at `step` or later exists under `ckpts`; the step it holds."
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = latest_checkpoint(ckpts) if (ckpts / "latest.json").exists() else None
        if latest is not None and latest.name >= f"step_{step:08d}":
            break
        assert p.poll() is None, p.stdout.read()[-4000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return read_checkpoint(latest_checkpoint(ckpts))["state"]["step"]


def test_resume_after_sigkill_is_bit_identical(tmp_path, prepared_root):
    ref = tiny(tmp_path / "ref", prepared_root)
    finish(run_train(ref))
    cut = tiny(tmp_path / "cut", prepared_root, checkpoint_every=2)
    ckpts = Path(cut["out_dir"]) / "checkpoints"
    killed_at = kill_after_checkpoint(run_train(cut), ckpts, 4)  # mid-epoch 1 (8 steps per epoch)
    assert 4 <= killed_at < 16, killed_at
    out = finish(run_train(cut))
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 16
    a, b = final_params(ref["out_dir"]), final_params(cut["out_dir"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.parametrize("loss", ["clip", "rankclip"])
def test_ddp_two_processes_equal_one(tmp_path, prepared_root, loss):
    # convnext_atto has LayerNorm and no batch statistics; with drop-path 0 and the CLIP text
    # transformer (no dropout), two ranks with B/2 each must follow one rank with B.
    # Adam turns round-off into full-size steps on parameters whose true gradient is zero (the
    # attention key biases: softmax ignores a constant added to every key); eps = 1e-6 keeps those
    # at rest, far below the real gradients, so the comparison measures DDP rather than round-off.
    kw = dict(image_encoder="convnext_atto", loss=loss, epochs=1, limit=256, batch_size=64, lr=1e-3, eps=1e-6)
    one, two = tiny(tmp_path / "one", prepared_root, **kw), tiny(tmp_path / "two", prepared_root, **kw)
    finish(run_train(one))
    finish(run_train(two, nproc=2))
    a, b = final_params(one["out_dir"]), final_params(two["out_dir"])
    changed = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
        changed += 0 if k.endswith("num_batches_tracked") else 1
    from rankclip.train import build_model
    torch.manual_seed(0)
    init = build_model(TrainConfig(**one)).state_dict()
    assert changed > 0 and any((init[k] - a[k]).abs().max() > 1e-4 for k in a), "training did not move the parameters"


def test_local_loss_ddp_equals_global(tmp_path, prepared_root):
    kw = dict(image_encoder="convnext_atto", loss="rankclip", epochs=1, limit=128, batch_size=64, lr=1e-3, eps=1e-6)
    glob = tiny(tmp_path / "g", prepared_root, **kw)
    loc = tiny(tmp_path / "l", prepared_root, local_loss=True, **kw)
    finish(run_train(glob, nproc=2))
    finish(run_train(loc, nproc=2))
    a, b = final_params(glob["out_dir"]), final_params(loc["out_dir"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


class NaNAt:
    "Wraps a loss so that its `cross` term is NaN at one call."
    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def __call__(self, *a, **kw):
        terms = self.inner(*a, **kw)
        if self.calls == self.at:
            terms = {**terms, "cross": terms["cross"] * float("nan")}
            terms["total"] = terms["clip"] + terms["cross"]
        self.calls += 1
        return terms


def test_nonfinite_loss_stops_with_named_term_and_keeps_checkpoint(tmp_path, prepared_root, monkeypatch):
    import rankclip.train as T
    real = T.build_loss
    monkeypatch.setattr(T, "build_loss", lambda cfg, rt: NaNAt(real(cfg, rt), at=5))
    cfg = TrainConfig(**tiny(tmp_path / "nan", prepared_root, checkpoint_every=2, epochs=1, threads=None))
    with pytest.raises(NonFiniteLossError) as e:
        fit(cfg)
    assert "step 5" in str(e.value) and "'cross'" in str(e.value)
    good = read_checkpoint(latest_checkpoint(tmp_path / "nan" / "checkpoints"))
    assert good["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in good["model"].values())

    monkeypatch.setattr(T, "build_loss", lambda cfg, rt: NaNAt(real(cfg, rt), at=5))
    cfg = TrainConfig(**tiny(tmp_path / "skip", prepared_root, epochs=1, nonfinite="skip", threads=None))
    summary = fit(cfg)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8


def test_corrupt_checkpoint_is_refused(tmp_path, prepared_root):
    cfg = TrainConfig(**tiny(tmp_path / "c", prepared_root, epochs=1, max_steps=2, threads=None))
    fit(cfg)
    ck = latest_checkpoint(tmp_path / "c" / "checkpoints")
    blob = bytearray((ck / "optimizer.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (ck / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        fit(TrainConfig(**{**tiny(tmp_path / "c", prepared_root, threads=None), "epochs": 1}))
    (ck / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        fit(TrainConfig(**{**tiny(tmp_path / "c", prepared_root, threads=None), "epochs": 1}))


def test_bad_configuration_is_named():
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="ranklip")
    with pytest.raises(ConfigError, match="batchsize"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig.from_dict({"lr": "fast"})
    assert TrainConfig.from_dict({"lr": "1e-3", "max_steps": None}).lr == 1e-3
    with pytest.raises(ConfigError, match="validation = 0.1 applies to data=emoji only"):
        TrainConfig(data="/corpus/train.csv", validation=0.1)
    with pytest.raises(ConfigError, match=r"validation = 1.0 is invalid: expected a fraction in \[0, 1\)"):
        TrainConfig(validation=1.0)
    with pytest.raises(ConfigError, match="text_dropout"):
        TrainConfig(text_dropout=-0.1)
    with pytest.raises(ValueError, match="divisible"):
        from rankclip.train import GlobalBatchSampler
        GlobalBatchSampler(100, 10, world_size=3)


def test_validation_split_is_carved_from_the_training_vendors(prepared_root):
    "validation holds a fraction of the emoji out of training, all their drawings; validation_drawings are those emoji by the training vendors, without skin tone, the same for every seed."
    import numpy as np
    from rankclip.config import load_training_pairs, validation_drawings, validation_emoji
    from rankclip.data import load_prepared
    src = load_prepared("emoji", prepared_root)
    cfg = TrainConfig(data_root=str(prepared_root), validation=0.1)
    held = validation_emoji(src, cfg.train_vendors, 0.1)
    drawn = np.unique(np.asarray(src.labels["emoji"])[np.asarray(src.labels["vendor"]) != src.label_names["vendor"].index("facebook")])
    assert abs(len(held) - 0.1 * len(drawn)) <= 1 and set(held) <= set(drawn)
    assert np.array_equal(held, validation_emoji(src, cfg.train_vendors, 0.1))  # fixed, whatever the run's seed
    full, carved = load_training_pairs(TrainConfig(data_root=str(prepared_root))), load_training_pairs(cfg)
    emoji_of = dict(zip(src.captions, src.labels["emoji"]))
    assert not {emoji_of[c] for c in carved[1]} & set(held)  # no drawing of a validation emoji is trained on
    assert len(carved[1]) == sum(emoji_of[c] not in set(held) for c in full[1])  # and nothing else is dropped
    images, labels, names = validation_drawings(cfg)
    vendor, tone = np.asarray(src.labels["vendor"]), np.asarray(src.labels["skin_tone"])
    rows = np.flatnonzero(np.isin(src.labels["emoji"], held) & (tone == src.label_names["skin_tone"].index("none"))
                          & (vendor != src.label_names["vendor"].index("facebook")))
    assert len(images) == len(labels) == len(rows) and np.array_equal(images, np.asarray(src.images[rows]))
    assert len(names) == len(held) and sorted(set(labels)) == list(range(len(held)))
    assert all(n and ";" not in n for n in names)
    with pytest.raises(ConfigError, match="no emoji were held out"):
        validation_drawings(TrainConfig(data_root=str(prepared_root)))
