"""Warm kernels (rankclip.warm): Papermill with the kernel spec `rankclip` runs a notebook as the plain `python3` kernel does,
in a kernel forked from the warm server, which goes when its Papermill goes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

CELLS = [
    "import os, sys, torch, pandas as pd, matplotlib.pyplot as plt",
    "n = 3",  # parameters
    "torch.manual_seed(n); x = torch.randn(n, n); print(round(float((x @ x.T).trace()), 6), os.getcwd(), os.environ.get('WHO'))",
    "pd.DataFrame({'a': range(n)})",
    "fig, ax = plt.subplots(); ax.plot([1, 2]); plt.show()",
    "print('pid', os.getpid(), 'parent', os.getppid(), 'rankclip' in sys.modules, 'torch' in sys.modules)",
]


def notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)
    return path


def papermill(src, dst, kernel, cwd, **env):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "WHO": "test", **env}
    return subprocess.Popen([str(BIN / "papermill"), str(src), str(dst), "-k", kernel, "--cwd", str(cwd), "-p", "n", "4",
                             "--no-progress-bar"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outputs(path: Path) -> list:
    "Each cell's printed text and plain-text results, the pid line left out; and whether a PNG was shown."
    nb = nbformat.read(path, as_version=4)
    out = [[o.get("text") or o.get("data", {}).get("text/plain") for o in c.outputs] for c in nb.cells[:-1]]
    return out, any("image/png" in o.get("data", {}) for c in nb.cells for o in c.outputs)


def pid_line(path: Path) -> list[str]:
    return nbformat.read(path, as_version=4).cells[-1].outputs[0]["text"].split()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_warm_kernel_runs_the_notebook_as_a_plain_kernel_does_and_goes_with_papermill(tmp_path):
    src = notebook(tmp_path / "nb.ipynb")
    runs = {}
    for name, kernel, env in [("plain", "python3", {}), ("warm", "rankclip", {}), ("warm2", "rankclip", {}),
                              ("off", "rankclip", {"RANKCLIP_WARM": "0"})]:
        p = papermill(src, tmp_path / f"{name}.ipynb", kernel, tmp_path, **env)
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log
        runs[name] = (p.pid, pid_line(tmp_path / f"{name}.ipynb"))
    plain = outputs(tmp_path / "plain.ipynb")
    assert plain[1] and "4" in str(plain[0][1:]) and str(tmp_path) in str(plain[0])  # the parameter, the folder, a figure
    for name in ("warm", "warm2", "off"):
        assert outputs(tmp_path / f"{name}.ipynb") == plain, name
    _, warm = runs["warm"]
    _, warm2 = runs["warm2"]
    server = int(warm[3])
    assert int(warm2[3]) == server and server not in (runs["warm"][0], runs["warm2"][0])  # forked by one server, not by Papermill
    assert b"rankclip.warm" in Path(f"/proc/{server}/cmdline").read_bytes()
    assert warm[4:] == ["False", "True"]  # torch came from the server; rankclip is never in it (each kernel imports the stage's code)
    assert int(runs["off"][1][3]) == runs["off"][0]  # RANKCLIP_WARM=0: Papermill started it
    assert not alive(int(warm[1])) and not alive(int(warm2[1]))  # shut down with their Papermill


def test_kernel_is_killed_with_its_papermill(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(600)")])
    nbformat.write(nb, tmp_path / "slow.ipynb")
    p = subprocess.Popen([str(BIN / "papermill"), str(tmp_path / "slow.ipynb"), str(tmp_path / "out.ipynb"), "-k", "rankclip",
                          "--cwd", str(tmp_path), "--no-progress-bar"], env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while not (tmp_path / "pid").exists() and time.monotonic() < end:
        time.sleep(0.1)
    kernel = int((tmp_path / "pid").read_text())
    assert alive(kernel)
    p.kill(); p.wait()
    end = time.monotonic() + 10
    while alive(kernel) and time.monotonic() < end:
        time.sleep(0.1)
    assert not alive(kernel), "the kernel outlived its Papermill"
