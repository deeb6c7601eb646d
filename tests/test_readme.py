"""The README's results table is the one the pipeline wrote: `rankclip readme` copies
results/report/headline.md between the README's markers, and `--check` fails when they differ."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKCLIP = Path(sys.executable).parent / "rankclip"
START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def readme(*args, cwd=ROOT):
    return subprocess.run([str(RANKCLIP), "readme", "--params", str(ROOT / "params.yaml"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_committed_readme_shows_the_committed_headline():
    text = (ROOT / "README.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "README.md: the headline markers are missing"
    head = ROOT / "results" / "report" / "headline.md"
    assert head.is_file(), "results/report/headline.md is not committed: run `dvc repro` and commit results/"
    r = readme("--check")
    assert r.returncode == 0, r.stdout + r.stderr
    block = text[text.index(START) + len(START):text.index(END)].strip()
    assert block == head.read_text().strip() and "RankCLIP" in block and "[" in block  # intervals, not bare means


def test_readme_copies_checks_and_reports_bad_input(tmp_path):
    head, doc = tmp_path / "headline.md", tmp_path / "README.md"
    head.write_text("| cell | top1 |\n|---|---|\n| clip | 1.0 [0.5, 1.5] (n=3) |\n")
    doc.write_text(f"# x\n\n{START}\nold table\n{END}\n\nmore\n")
    r = readme("--check", "--headline", str(head), "--readme", str(doc))
    assert r.returncode != 0 and "differs" in r.stderr + r.stdout
    assert readme("--headline", str(head), "--readme", str(doc)).returncode == 0
    assert doc.read_text() == f"# x\n\n{START}\n{head.read_text()}{END}\n\nmore\n"
    assert readme("--check", "--headline", str(head), "--readme", str(doc)).returncode == 0
    missing = readme("--headline", str(tmp_path / "nope.md"), "--readme", str(doc))
    assert missing.returncode == 1 and "nope.md" in missing.stderr and "dvc repro" in missing.stderr
    doc.write_text("# no markers\n")
    r = readme("--headline", str(head), "--readme", str(doc))
    assert r.returncode == 1 and "README.md" in r.stderr and START in r.stderr
