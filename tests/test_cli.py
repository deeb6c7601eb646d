"""The command line as a user meets it: overrides that must name a parameter, and mistakes that print one
line instead of a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def rankclip(*args, cwd):
    return subprocess.run([str(BIN / "rankclip"), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(tmp_path, prepared_root):
    "A folder with a params.yaml whose `train` section is a two-step run on the prepared emoji."
    train = dict(image_encoder="resnet10t", text_encoder="clip-2x128", embed_dim=16, image_size=32,
                 data_root=str(prepared_root), limit=128, batch_size=32, epochs=1, max_steps=2, warmup_steps=1,
                 threads=1, progress=False, out_dir=str(tmp_path / "run"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    return tmp_path


def test_override_must_name_an_existing_parameter(project):
    r = rankclip("train", "-S", "lr=1e-3", cwd=project)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "did you mean 'train.lr'" in r.stderr and "Traceback" not in r.stderr
    assert not (project / "run").exists(), "nothing trained on a refused override"


def test_override_of_a_training_parameter_reaches_the_run(project):
    r = rankclip("train", "-S", "train.lr=1e-3", "-S", "train.loss=clip", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    config = json.loads((project / "run" / "run.json").read_text())["config"]
    assert config["lr"] == 0.001 and config["loss"] == "clip"


@pytest.mark.parametrize("args, names", [
    (["evaluate", "/nonexistent/model"], "/nonexistent/model"),
    (["train", "-S", "train.image_encoder=nosuchnet"], "nosuchnet"),
    (["train", "-S", "train.loss=ranklip"], "ranklip"),
    (["train", "-S", "train.data=cc3m"], "cc3m"),
])
def test_user_errors_print_one_line(project, args, names):
    r = rankclip(*args, cwd=project)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and names in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fp16_trains_with_a_gradient_scaler(tmp_path, prepared_root):
    from rankclip.checkpoint import latest_checkpoint, read_checkpoint
    from rankclip.config import TrainConfig
    from rankclip.train import fit
    cfg = TrainConfig(image_encoder="resnet10t", embed_dim=16, data_root=str(prepared_root), limit=128, batch_size=32,
                      epochs=1, max_steps=3, warmup_steps=1, threads=1, progress=False, precision="fp16",
                      out_dir=str(tmp_path / "fp16"))
    summary = fit(cfg)
    scaler = read_checkpoint(latest_checkpoint(tmp_path / "fp16" / "checkpoints"))["state"]["grad_scaler"]
    assert summary["steps"] == 3 and 0 < scaler["scale"] <= 2.0 ** 16
    run = json.loads((tmp_path / "fp16" / "run.json").read_text())
    assert run["precision"] == "torch.float16"


def test_study_deps_prints_a_stages_modules():
    "`rankclip study deps STAGE` (the README's way to write dvc.yaml's deps) prints the modules the stage runs, `@item` allowed."
    root = Path(__file__).resolve().parents[1]
    r = rankclip("study", "deps", "sweep@bert-base", cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = r.stdout.split()
    assert {"rankclip/sweep.py", "rankclip/train.py", "rankclip/features.py"} <= set(listed) and "rankclip/report.py" not in listed
    assert "rankclip/evaluate.py" not in rankclip("study", "deps", "train", cwd=root).stdout.split()
