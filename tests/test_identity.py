"""What a run is: refactors of the training code are proved bit-identical against digests stored before them."""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import rankclip.runs as runs
from rankclip.deps import PACKAGE, code_fingerprint
from rankclip.runs import (DIGEST_CELLS, finished, machine_key, open_run, resolve_run, run_state, short_run_digests,
                           stored_digests)
from rankclip.study import load_params
from rankclip.train import fit

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = ROOT / "tests" / "short_run_digests.json"


def test_short_runs_are_bit_identical_to_the_stored_digests(tmp_path, prepared_root):
    stored = json.loads(DIGESTS.read_text())
    entry = stored_digests(stored)
    if entry is None:
        pytest.skip(f"no digests stored for this machine ({machine_key()}; stored: {sorted(stored)}): "
                    f"bit-identity holds only on alike CPUs; record them with `rankclip study digest --record {DIGESTS.relative_to(ROOT)}`")
    params = load_params(ROOT / "params.yaml")
    params["train"]["data_root"] = str(prepared_root)  # prepared from the fetched data/ here: a fresh clone has no prepared/
    assert short_run_digests(params, tmp_path, DIGEST_CELLS) == entry[1], f"digests stored for {entry[0]!r}"


def _files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_finished_run_is_reused_when_only_execution_or_docstrings_change(tmp_path, monkeypatch, prepared_root):
    params = load_params(ROOT / "params.yaml")
    params["train"]["data_root"] = str(prepared_root)
    cfg = replace(resolve_run(params, "rankclip", 0, "smoke", runs_root=tmp_path / "runs"), max_steps=2)
    assert open_run(cfg) == "new"
    fit(cfg)
    before = _files(tmp_path / "runs")
    assert open_run(replace(cfg, progress=not cfg.progress, log_every=5, checkpoint_every=3, keep_checkpoints=4)) == "finished"
    assert open_run(replace(cfg, cyclip_lambda_in=0.5)) == "finished"  # another loss's option

    edited = tmp_path / "pkg" / "rankclip"  # the package with a report-only function's docstring and body edited
    shutil.copytree(PACKAGE, edited, ignore=shutil.ignore_patterns("__pycache__"))
    src = (edited / "data.py").read_text()
    start = src.index("def montage(")
    doc = src.index('"', start)
    (edited / "data.py").write_text(src[:doc + 1] + "Edited: " + src[doc + 1:])
    models = (edited / "models.py").read_text()
    (edited / "models.py").write_text(models.replace("def describe_encoder(name: str) -> str:\n", "def describe_encoder(name: str) -> str:\n    name = str(name)\n", 1))
    assert code_fingerprint(package=edited) == code_fingerprint()
    monkeypatch.setattr(runs, "code_fingerprint", lambda entry="train.fit": code_fingerprint(entry, package=edited))
    assert open_run(cfg) == "finished" and finished(cfg.out_dir)["steps"] == 2
    assert _files(tmp_path / "runs") == before  # nothing deleted, nothing rewritten

    changed = replace(cfg, lambda_in=0.5)
    old_id = run_state(cfg.out_dir)["id"]
    assert open_run(changed) == "new"
    aside = Path(cfg.out_dir).with_name(f"seed0.{old_id}")  # moved aside whole, not deleted
    assert {p.relative_to(aside) for p in _files(aside)} == {p.relative_to(cfg.out_dir) for p in before}
