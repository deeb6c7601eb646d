"""The study pipeline end to end: `dvc repro` of the smoke profile in a temporary copy of the repository,
then no-op reproduction, and a one-lambda change that makes exactly one cell stale."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CELL = "lambda_c32_i32"


def sh(args, cwd, check=True, timeout=600, env=None):
    "Run a command with the project's environment first on PATH (and `env` added); return the completed process."
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **(env or {})}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def keep_cells(text: str, cells: set[str]) -> str:
    "params.yaml text with only `cells` left under study.cells (one cell per line, as the file writes them)."
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if re.match(r"^\S", line): inside = False
        if line.startswith("  cells:"): inside = True
        m = re.match(r"^    (\w+): \{", line)
        if not (inside and m and m.group(1) not in cells): out.append(line)
    return "".join(out)


def copy_repo(dst: Path, cells: set[str]) -> Path:
    """The working tree's tracked and unignored files (no results), data/ and prepared/ if present (with the prepare stage's
    lock entry when the repository has one), as a fresh git repository running the smoke profile on `cells`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if f.startswith("results/") or f == "dvc.lock" or not (ROOT / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    shutil.copytree(ROOT / "data", dst / "data")
    if not (ROOT / "prepared").is_dir():  # a fresh clone: the copy's pipeline runs its prepare stage itself
        lock = None
    else:
        shutil.copytree(ROOT / "prepared", dst / "prepared")
        lock = ROOT / "dvc.lock"
    prepared = lock is not None and lock.exists() and "prepare" in (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    if prepared:
        entry = yaml.safe_load(lock.read_text())["stages"]["prepare"]
        (dst / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": entry}}, sort_keys=False))
    text = re.sub(r"(?m)^profile: \w+", "profile: smoke", (dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(keep_cells(text, cells))
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        sh(args, dst)
    if prepared:  # the copied prepared/ into the copy's DVC cache (a second), so that `dvc repro` does not prepare it again (18 s)
        sh(["dvc", "commit", "--force", "prepare"], dst)
    return dst


def stale_stages(repo: Path) -> set[str]:
    "Names of the stages `dvc status` reports as changed."
    return set(json.loads(sh(["dvc", "status", "--json"], repo).stdout or "{}"))


def test_experiment_notebooks_keep_their_parameters_tag():
    for name in ("train", "evaluate", "report"):
        nb = nbformat.read(ROOT / "nbs" / "experiments" / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"nbs/experiments/{name}.ipynb: needs exactly one cell tagged 'parameters'"
        assert not any("nbdev_export" in c.source for c in nb.cells)


def test_every_cell_becomes_a_stage_with_its_own_params():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    r = sh(["dvc", "stage", "list", "--name-only"], ROOT)
    stages = set(r.stdout.split())
    cells = set(params["study"]["cells"])
    assert {f"{kind}@{c}" for c in cells for kind in ("train", "evaluate")} <= stages
    assert {"prepare", "tokenizers", "report"} <= stages
    assert len(cells) == 7 + 8 + 8  # baselines/variants/official/decay, the 3x3 lambda grid less its (1/16, 1/16) centre, 4 encoders x 2 losses
    grid = {(c["lambda_cross"], c["lambda_in"]) for c in params["study"]["cells"].values() if "lambda_cross" in c and "lambda_in" in c}
    assert {(a, b) for a in (1 / 16, 1 / 32, 1 / 64) for b in (1 / 16, 1 / 32, 1 / 64)} - {(1 / 16, 1 / 16)} <= grid


def test_dvc_yaml_lists_the_modules_each_stage_runs():
    "dvc.yaml's rankclip/*.py deps of each stage are the modules its imports reach (rankclip.deps.stage_modules), no more, no less."
    from rankclip.deps import stage_modules
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        listed = {d for d in body.get("deps", []) if isinstance(d, str) and d.startswith("rankclip/")}
        assert listed == set(stage_modules(name, ROOT)), (name, sorted(listed ^ set(stage_modules(name, ROOT))))


def test_each_cell_names_its_seed_group():
    "train@ and evaluate@ depend on their cell's seed group alone (profiles.<p>.seeds.<group>), so every cell names one."
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for p, prof in params["profiles"].items():
        for cell, spec in params["study"]["cells"].items():
            assert spec.get("seeds") in prof["seeds"], f"params.yaml: study.cells.{cell}.seeds = {spec.get('seeds')!r} is no group of profiles.{p}.seeds"


# The whole smoke grid (23 cells) takes longer than a test should (two kernel starts and imports per cell):
# the test runs one cell of each kind: two main cells (2 seeds), a lambda-grid cell, a BERT cell.
CELLS = {"clip", "rankclip", CELL, "bert_clip"}


def test_keep_cells_leaves_other_sections_alone():
    text = (ROOT / "params.yaml").read_text()
    kept = yaml.safe_load(keep_cells(text, CELLS))
    full = yaml.safe_load(text)
    assert set(kept["study"]["cells"]) == CELLS
    assert {k: v for k, v in kept.items() if k != "study"} == {k: v for k, v in full.items() if k != "study"}


def test_smoke_pipeline_reproduces_and_reruns_only_the_changed_cell(tmp_path):
    repo = copy_repo(tmp_path / "repo", CELLS)
    t0 = time.perf_counter()
    r = sh(["dvc", "repro"], repo)
    first = time.perf_counter() - t0
    print(f"smoke dvc repro: {first:.0f} s")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    cells = list(params["study"]["cells"])
    for c in cells:
        m = json.loads((repo / "results" / "runs" / c / "metrics.json").read_text())
        seeds = [k for k in m if k.startswith("seed")]
        expected = params["profiles"]["smoke"]["seeds"][params["study"]["cells"][c].get("seeds", "ablation")]
        assert seeds == [f"seed{s}" for s in expected], (c, seeds)
        assert 0 <= m["mean"]["heldout_vendor.zero_shot.emoji"]["top1"] <= 1
        assert -1 <= m["mean"]["heldout_vendor.rank_consistency"]["spearman_cross"] <= 1
        assert (repo / "models" / c / "seed0" / "model" / "config.json").exists()  # the train stage's output, in DVC's cache
        run = json.loads((repo / "results" / "runs" / c / "seeds" / "seed0" / "run.json").read_text())
        assert run["profile"] == "smoke" and run["cell"] == c and run["cpu"]["threads"] >= 1
        assert run["train_seconds"] > 0 and run["evaluate_seconds"] > 0
        assert (repo / "results" / "runs" / c / "curves" / "seed0" / "train" / "total.tsv").exists()
        for kind in ("train", "evaluate"):
            nb = nbformat.read(repo / "results" / "runs" / c / f"{kind}.ipynb", as_version=4)
            assert any("injected-parameters" in cell.metadata.get("tags", []) for cell in nb.cells)
        train_nb = nbformat.read(repo / "results" / "runs" / c / "train.ipynb", as_version=4)  # its loss curve, shown by the (warm) kernel
        assert any("image/png" in o.get("data", {}) for cell in train_nb.cells for o in cell.get("outputs", []))
    for encoder in params["sweep"]["encoders"]:  # the encoders' sweep ran at the smoke profile's grid, and the report shows it
        sweep = json.loads((repo / "results" / "sweep" / f"{encoder}.json").read_text())
        assert sweep["profile"] == "smoke" and [p["lr"] for p in sweep["points"]] == params["sweep"]["profiles"]["smoke"]["grid"]["lr"]
        assert sweep["chosen"] in [{"lr": p["lr"]} for p in sweep["points"]] and sweep["points"][0]["validation_top1"]["n"] > 100
    assert "bert-base" in (repo / "results" / "report" / "tables" / "sweep.csv").read_text()
    assert "answers" in (repo / "results" / "report" / "tables" / "encoder_learning.csv").read_text().splitlines()[0]
    bert = json.loads((repo / "results" / "runs" / "bert_clip" / "seeds" / "seed0" / "run.json").read_text())
    assert bert["config"]["text_encoder"] == params["profiles"]["smoke"]["encoders"]["bert-base"]
    assert bert["config"]["tokenizer"] == "runs/tokenizers/bert"
    summary = json.loads((repo / "results" / "report" / "summary.json").read_text())  # one short-named number per claim and ablation answer
    assert set(summary) == {c["key"] for c in params["report"]["claims"]} | set(params["report"]["summary"])
    assert isinstance(summary["zs"], float) and summary["zs_C"] is None and summary["A_in"] is None  # rankclip_c and the grid did not run
    claims = (repo / "results" / "report" / "claims.md").read_text()
    assert "RankCLIP beats CLIP at zero-shot classification" in claims and "not run (no results of 'rankclip_c')" in claims
    for f in ("lambda_grid", "architectures", "modality_gap", "training_curves", "retrieval_gallery", "rank_agreement"):
        assert (repo / "results" / "report" / "figures" / f"{f}.png").stat().st_size > 5000
    assert "paired" in (repo / "results" / "report" / "tables" / "paired_differences.md").read_text()
    headline = (repo / "results" / "report" / "headline.md").read_text()
    assert "| RankCLIP − CLIP, paired by seed" in headline and "RankCLIP minus CLIP, paired by seed: the interval" in headline
    assert "Training and evaluating the study's 6 runs took" in headline

    assert stale_stages(repo) == set()
    again = sh(["dvc", "repro"], repo)
    assert "Running stage" not in again.stdout, again.stdout

    # DVC's own views work offline: metrics and the plots page, whose scripts are inlined (.dvc/config's template)
    assert '"zs"' in sh(["dvc", "metrics", "show", "--json"], repo).stdout
    sh(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "vega-embed" in page and "vegaEmbed(" in page and "total.tsv" in page
    assert not re.search(r"""<(script|link|img)\b[^>]*(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)

    # Two edits, reproduced together (one report, not two): a lambda changed in one cell retrains that cell alone; a seed
    # added to another cell (its group moves from ablation, seed 0, to main, seeds 0 and 1) trains and evaluates that seed
    # alone, reusing seed 0, not retraining or re-evaluating it, and deleting nothing.
    text = (repo / "params.yaml").read_text()
    line = re.search(rf"(?m)^    {CELL}: .*lambda_in: 0\.03125", text)
    assert line, f"params.yaml: no line for cell {CELL} with lambda_in 0.03125"
    (repo / "params.yaml").write_text(text.replace(line.group(0), line.group(0).replace("lambda_in: 0.03125", "lambda_in: 0.0078125")))
    changed = yaml.safe_load((repo / "params.yaml").read_text())["study"]["cells"][CELL]
    assert (changed["lambda_cross"], changed["lambda_in"]) == (0.03125, 0.0078125)
    assert stale_stages(repo) == {f"train@{CELL}", "report"}  # the report reads every cell's parameters
    text = (repo / "params.yaml").read_text()
    line = re.search(r"(?m)^    bert_clip: .*seeds: (ablation3?)\}", text)
    (repo / "params.yaml").write_text(text.replace(line.group(0), line.group(0).replace(f"seeds: {line.group(1)}", "seeds: main")))
    assert stale_stages(repo) == {f"train@{CELL}", "train@bert_clip", "evaluate@bert_clip", "report"}
    files_before = {p for p in (repo / "runs" / "bert_clip").rglob("*") if p.is_file()}
    r = sh(["dvc", "repro"], repo)
    ran = set(re.findall(r"Running stage '([^']+)'", r.stdout))
    assert ran == {f"train@{CELL}", f"evaluate@{CELL}", "train@bert_clip", "evaluate@bert_clip", "report"}, r.stdout
    run = json.loads((repo / "results" / "runs" / CELL / "seeds" / "seed0" / "run.json").read_text())
    assert run["config"]["lambda_in"] == 0.0078125
    model0 = json.loads((repo / "models" / "bert_clip" / "seed0" / "run.json").read_text())
    assert model0["run"] == "finished" and json.loads((repo / "models" / "bert_clip" / "seed1" / "run.json").read_text())["run"] == "new"
    assert "seed 0: reused" in "".join(o.get("text", "") for c in nbformat.read(repo / "results" / "runs" / "bert_clip" / "evaluate.ipynb", as_version=4).cells
                                        for o in c.get("outputs", []))
    assert files_before <= {p for p in (repo / "runs" / "bert_clip").rglob("*") if p.is_file()}  # nothing deleted
    assert list(json.loads((repo / "results" / "runs" / "bert_clip" / "metrics.json").read_text())) == ["mean", "seed0", "seed1", "timing"]
    assert stale_stages(repo) == set()
    # two states of the study side by side fit a terminal of 160 columns: the metrics and the parameters that differ
    # (the README's command: --drop hides the dependency columns, whose names are paths)
    shown = sh(["dvc", "exp", "show", "--only-changed", "--drop", ".*/|prepared$|data$", "--no-pager"], repo, env={"COLUMNS": "1000"}).stdout
    assert "lambda_in" in shown and max(map(len, shown.splitlines())) <= 160, shown
    print(f"smoke dvc repro: {first:.0f} s, rerun of two changed cells: {time.perf_counter() - t0 - first:.0f} s")

    # a change to the evaluation code makes every evaluation stale and no training
    code = repo / "rankclip" / "evaluate.py"
    original = code.read_text()
    code.write_text(original + "\n# an evaluation change\n")
    assert stale_stages(repo) == {f"evaluate@{c}" for c in CELLS}
    code.write_text(original)
    assert stale_stages(repo) == set()

    # a broken cell fails its own stage with the notebook's error and keeps the executed notebook; nothing else is lost
    text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(text.replace("  cells:\n", "  cells:\n    broken: {loss: rankclip, lambda_in: -1, seeds: ablation}\n", 1))
    r = sh(["dvc", "repro", "--keep-going"], repo, check=False)
    assert r.returncode != 0 and "lambda_in" in r.stdout + r.stderr
    failed = nbformat.read(repo / "results" / "runs" / "broken" / "train.ipynb", as_version=4)
    assert any(o.get("output_type") == "error" and "lambda_in" in o.get("evalue", "") for c in failed.cells
               for o in c.get("outputs", []))
    assert stale_stages(repo) == {"train@broken", "evaluate@broken", "report"}
    assert all((repo / "results" / "runs" / c / "metrics.json").exists() for c in CELLS)

