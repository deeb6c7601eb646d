"""JupyterLab as a person uses it: `jupyter lab` (what `make lab` runs) starts on loopback and answers,
the project's kernel is registered and runs this checkout's package, and library modules import
through that kernel.

Executing every library notebook is the docs build's job (tests/test_docs.py: each notebook runs once
per test session, in an execnb shell as nbdev-test runs it). Here every library notebook gets the
check that the kernel matters for: its module imports in the kernel and defines
every name of its `__all__`.
"""
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
BIN = Path(sys.executable).parent


def library_notebooks() -> dict[str, str]:
    "Library notebook name -> the module it exports (its `#| default_exp`)."
    out = {}
    for nb in sorted(NBS.glob("[0-9]*.ipynb")):
        src = "\n".join(c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "code")
        m = re.search(r"^#\|\s*default_exp\s+(\S+)", src, re.M)
        if m: out[nb.name] = m.group(1)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10):
    "(status, body) of a GET; HTTP errors are answers too."
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read().decode()
    except urllib.error.HTTPError as e: return e.code, e.read().decode()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A JupyterLab server started as `make lab` starts it, on a free loopback port with a token."
    tmp = tmp_path_factory.mktemp("lab")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config")}
    cmd = [str(BIN / "jupyter"), "lab", "--ip", "127.0.0.1", "--no-browser", "--allow-root",
           "--port", str(port), f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0"]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                if get(f"{base}/api/status?token={token}", 2)[0] == 200: break
            except OSError: pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer on {base} within 120 s:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token, "log": tmp / "server.log"}
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()


def test_server_answers_on_loopback(lab):
    base, token = lab["base"], lab["token"]
    status, body = get(f"{base}/api/status?token={token}")
    assert status == 200 and "started" in json.loads(body)
    status, page = get(f"{base}/lab?token={token}")
    assert status == 200 and "<title>JupyterLab</title>" in page and "jupyter-config-data" in page
    assert get(f"{base}/api/status")[0] == 403, "the server answers API calls without the token"
    status, body = get(f"{base}/api/kernelspecs?token={token}")
    specs = json.loads(body)
    assert status == 200 and specs["default"] == "python3" and "python3" in specs["kernelspecs"]


def test_project_kernel_is_registered_in_the_environment():
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.resource_dir).resolve().is_relative_to(Path(sys.prefix).resolve()), \
        f"kernel python3 comes from {spec.resource_dir}, not from this environment ({sys.prefix}): run `make setup`"


def execute_on_server(lab, code: str, timeout: float = 120) -> str:
    "Start a kernel through the server's REST API, run `code` over its websocket, return stdout; kernel deleted after."
    import websocket
    base, token = lab["base"], lab["token"]
    req = urllib.request.Request(f"{base}/api/kernels?token={token}", data=json.dumps({"name": "python3"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r: kernel = json.loads(r.read())
    ws = websocket.create_connection(f"ws://127.0.0.1:{base.rsplit(':', 1)[1]}/api/kernels/{kernel['id']}/channels?token={token}",
                                     timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({"header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                                       "msg_type": "execute_request", "version": "5.3"},
                            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                                        "allow_stdin": False, "stop_on_error": True}}))
        out, reply, idle, deadline = [], None, False, time.monotonic() + timeout
        while reply is None or not idle:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id: continue
            kind = msg["msg_type"]
            if kind == "stream": out.append(msg["content"]["text"])
            if kind == "error": pytest.fail("kernel error:\n" + "\n".join(msg["content"]["traceback"]))
            if kind == "execute_reply": reply = msg["content"]
            if kind == "status" and msg["content"]["execution_state"] == "idle": idle = True
            assert time.monotonic() < deadline, "kernel did not finish in time"
        assert reply["status"] == "ok", reply
        return "".join(out)
    finally:
        ws.close()
        urllib.request.urlopen(urllib.request.Request(f"{base}/api/kernels/{kernel['id']}?token={token}", method="DELETE"), timeout=30)


def test_server_kernel_runs_this_checkout(lab):
    out = execute_on_server(lab, "import sys, json, rankclip; print(json.dumps([sys.prefix, rankclip.__file__]))")
    prefix, package = json.loads(out.strip().splitlines()[-1])
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()
    assert Path(package).resolve().is_relative_to(ROOT / "rankclip")


def test_every_library_module_imports_in_kernel():
    from jupyter_client.manager import start_new_kernel
    modules = sorted(set(library_notebooks().values()))
    assert {"losses", "train", "cli"} <= set(modules)
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(NBS))
    try:
        code = ("import importlib, json\n"
                f"mods = {modules!r}\n"
                "res = {m: [n for n in importlib.import_module('rankclip.' + m).__all__\n"
                "           if not hasattr(importlib.import_module('rankclip.' + m), n)] for m in mods}\n"
                "print(json.dumps(res))")
        out = []
        reply = kc.execute_interactive(code, timeout=300, output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" and m["content"].get("name") == "stdout" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
        missing = json.loads("".join(out).strip().splitlines()[-1])
        assert set(missing) == set(modules) and not any(missing.values()), missing
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
