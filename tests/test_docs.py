"""The docs site as a reader sees it. `docs/build.py` (what `make docs` runs) builds it from the notebooks
(reusing the executed notebooks cached in _proc/ when they are current); headless Chromium (Debian's
`chromium`, driven over the DevTools protocol) opens every page from a loopback server with the
network flags off: no console errors, no request leaves loopback, equations are typeset by KaTeX,
figures decode. A full-page screenshot of each page goes to _site/_screenshots/ (with summary.json).

Without chromium the browser tests skip, unless CI is set: there a missing chromium fails.
"""
import base64
import functools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_site"
SHOTS = SITE / "_screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                  "--mute-audio", "--hide-scrollbars", "--window-size=1280,900", "--remote-debugging-port=0"]


# --- what the site must contain, worked out from the sources (not from the builder) ---

def expected_pages() -> list[str]:
    "Page files in navigation order: index, docs/pages/*.py, nbs/*.ipynb by name, the report if executed."
    strip = lambda name: re.sub(r"^\d+[a-zA-Z0-9]*_", "", name.lower()).rsplit(".", 1)[0] + ".html"
    nbs = sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))
    pages = ["index.html"] + [strip(p.name) for p in sorted((ROOT / "docs/pages").glob("*.py"))]
    pages += [strip(n) for n in nbs if n != "index.ipynb"]
    report = [ROOT / "nbs/experiments/report.ipynb", ROOT / "results/report.ipynb", ROOT / "results/report/report.ipynb"]
    if any(p.is_file() and any(c.get("outputs") for c in nbformat.read(p, as_version=4).cells) for p in report):
        pages.append("report.html")
    return pages


def display_math_count(path: Path) -> int:
    "Number of $$...$$ blocks in a docs page's markdown."
    text = "\n".join(l[2:] if l.startswith("# ") else l[1:] for l in path.read_text().splitlines() if l.startswith("#"))
    return len(re.findall(r"\$\$.+?\$\$", text, re.S))


# --- external references in the built files ---

LOADS = [
    re.compile(r"""<(?:script|img|iframe|audio|video|source|embed|track|input)\b[^>]*?\s(?:src|srcset|poster|data)\s*=\s*["']?\s*(https?:)?//""", re.I),
    re.compile(r"""<link\b[^>]*?\shref\s*=\s*["']?\s*(https?:)?//""", re.I),
    re.compile(r"""url\(\s*["']?\s*(https?:)?//""", re.I),
    re.compile(r"""@import\s+(?:url\()?\s*["']?\s*(https?:)?//""", re.I),
    re.compile(r"""\bimport\s*\(\s*["'`]https?://|\bfrom\s+["'`]https?://|\bfetch\s*\(\s*["'`]https?://""", re.I),
]
XML_NAMESPACES = re.compile(r"https?://www\.w3\.org/(?:2000/svg|1998/Math/MathML|1999/xlink|1999/xhtml|XML/1998/namespace)")


def external_loads(path: Path) -> list[str]:
    "References in an html/css/js file that make a browser fetch from another host (anchors are fine)."
    text = path.read_text(errors="replace")
    found = [text[m.start():m.start() + 120].split("\n")[0] for rx in LOADS for m in rx.finditer(text)]
    if path.suffix in (".js", ".mjs"):
        found += [u for u in re.findall(r"https?://[^\s\"'`)<>]+", XML_NAMESPACES.sub("", text))]
    return found


def test_report_page_drops_stderr_and_hides_marked_code():
    import importlib.util
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("#| echo: false\nprint(1)", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="IProgress not found\n"),
        nbformat.v4.new_output("stream", name="stdout", text="1\n")])])
    page, _ = build.prepare_for_html(nbformat.from_dict(nb), drop_stderr=True)
    (cell,) = page.cells
    assert [o["name"] for o in cell.outputs] == ["stdout"] and "remove-input" in cell.metadata["tags"]
    kept, _ = build.prepare_for_html(nbformat.from_dict(nb))
    assert [o["name"] for o in kept.cells[0].outputs] == ["stderr", "stdout"]


def test_external_load_scan_catches_cdn_references(tmp_path):
    (tmp_path / "a.html").write_text('<script src="https://cdn.jsdelivr.net/npm/katex/dist/katex.min.js"></script>\n'
                                      '<link rel="stylesheet" href="//fonts.googleapis.com/css">\n<a href="https://example.org">ok</a>')
    (tmp_path / "b.css").write_text('@font-face { src: url("https://fonts.gstatic.com/x.woff2") } /* see https://example.org */')
    (tmp_path / "c.js").write_text('const ns = "http://www.w3.org/2000/svg"; import("https://unpkg.com/x.js")')
    assert len(external_loads(tmp_path / "a.html")) == 2
    assert len(external_loads(tmp_path / "b.css")) == 1
    assert len(external_loads(tmp_path / "c.js")) == 2  # the import, by pattern and as a URL in a script


# --- the build ---

@pytest.fixture(scope="module")
def site():
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "docs/build.py")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"\ndocs build: {time.perf_counter() - t0:.0f} s\n{r.stdout}")
    return SITE


def nav_of(html: str) -> list[str]:
    nav = re.search(r'<nav\b[^>]*class="rc-nav".*?</nav>', html, re.S).group(0)
    return re.findall(r'<li><a\b[^>]*?href="([^"]+)"', nav)


def test_site_has_every_page_in_order(site):
    pages = expected_pages()
    assert pages[0] == "index.html" and {"method.html", "data_card.html", "losses.html"} <= set(pages)
    for page in pages:
        assert (site / page).is_file(), f"{page} was not built"
        assert nav_of((site / page).read_text()) == pages, f"{page}: navigation differs from the expected page order"


def test_api_cards_and_source_links(site):
    html = (site / "losses.html").read_text()
    assert re.search(r"<h3[^>]*>plackett_luce_nll", html), "show_doc's card for plackett_luce_nll is missing"
    links = set(re.findall(r'href="(src/[\w.]+\.html)#L-\d+"', html))
    assert "src/losses.py.html" in links and all((site / l).is_file() for l in links)
    assert not re.search(r'href="/', html), "a site-root link is left; pages must work from any folder"


def test_nothing_is_loaded_from_another_host(site):
    files = [p for p in site.rglob("*") if p.suffix in (".html", ".css", ".js", ".mjs")]
    assert len(files) > 10
    bad = {str(p.relative_to(site)): refs for p in files if (refs := external_loads(p))}
    assert not bad, f"external loads in the built site: {bad}"


def test_katex_is_vendored_with_its_fonts(site):
    css = site / "_static/katex/katex.min.css"
    fonts = set(re.findall(r"url\((fonts/[^)]+)\)", css.read_text()))
    assert fonts and all((css.parent / f).is_file() for f in fonts)
    assert (site / "_static/katex/katex.min.js").stat().st_size > 100_000


# --- the browser ---

def chromium_path():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe: return exe
    if os.environ.get("CI"): pytest.fail("chromium is not installed: `apt-get install chromium` (scripts/setup-system.sh)")
    pytest.skip("chromium is not installed (apt-get install chromium); with CI set this fails instead")


class DevTools:
    "The few DevTools-protocol calls the test needs, over one page target's websocket."
    def __init__(self, exe: str, profile: Path, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.loads(r.read()) if t["type"] == "page")
        import websocket
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log", "Network"): self.call(f"{domain}.enable")

    def call(self, method: str, params: dict | None = None) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            assert time.monotonic() < deadline, f"no {method} within {timeout} s"
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, js: str):
        r = self.call("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r: raise RuntimeError(f"{js[:60]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.log.close()


PAGE_FACTS = """(() => {
  const main = document.querySelector('main');
  const text = [];
  const walk = document.createTreeWalker(main, NodeFilter.SHOW_TEXT, {acceptNode: n =>
      n.parentElement.closest('pre, code, .katex, script, style') ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  while (walk.nextNode()) text.push(walk.currentNode.nodeValue);
  const plain = text.join(' ');
  return {
    title: document.title,
    math: document.documentElement.dataset.math || null,
    katex: main.querySelectorAll('.katex').length,
    katexDisplay: main.querySelectorAll('.katex-display').length,
    katexErrors: main.querySelectorAll('.katex-error').length,
    rawMath: (plain.match(/\\$\\$|\\\\frac|\\\\mathrm|\\\\sum/g) || []).length,
    figures: [...main.querySelectorAll('.jp-OutputArea-output img, .jp-RenderedImage img')].map(i =>
        ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
    images: [...document.images].map(i => ({src: i.src.slice(0, 60), ok: i.complete && i.naturalWidth > 0})),
    tables: [...main.querySelectorAll('table')].map(t => t.innerText.slice(0, 4000)),
    pastColumn: [...main.querySelectorAll('table, img, pre')].filter(e =>
        e.getBoundingClientRect().right > main.getBoundingClientRect().right + 1).map(e => e.tagName + ': ' + e.innerText.slice(0, 60)),
    pageWidth: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
  };
})()"""


def visit(tab: DevTools, url: str, shot: Path) -> dict:
    "Open `url`, wait for load and typesetting, take a full-page screenshot; the page's facts and messages."
    tab.events.clear()
    tab.call("Page.navigate", {"url": url})
    tab.wait_for("Page.loadEventFired")
    deadline = time.monotonic() + 10
    while tab.evaluate("document.documentElement.dataset.math || ''") != "typeset" and time.monotonic() < deadline:
        time.sleep(0.1)
    facts = tab.evaluate(PAGE_FACTS)
    height = min(max(int(facts["height"]), 900), 16000)
    png = tab.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                              "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}})
    shot.write_bytes(base64.b64decode(png["data"]))
    errors = []
    for e in tab.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif m == "Runtime.exceptionThrown":
            errors.append("exception: " + p["exceptionDetails"].get("exception", {}).get("description", p["exceptionDetails"]["text"]))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            errors.append(f"load failed: {p.get('errorText')}")
    requests = [e["params"]["request"]["url"] for e in tab.events if e.get("method") == "Network.requestWillBeSent"]
    return {**facts, "errors": errors, "requests": requests, "screenshot": str(shot.relative_to(ROOT))}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def browsed(site, tmp_path_factory):
    "Every page opened in headless Chromium from a loopback server: {page: facts}."
    exe = chromium_path()
    tmp = tmp_path_factory.mktemp("chromium")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    SHOTS.mkdir(exist_ok=True)
    tab = DevTools(exe, tmp / "profile", tmp / "chromium.log")
    t0 = time.perf_counter()
    try:
        results = {page: visit(tab, base + page, SHOTS / page.replace(".html", ".png")) for page in expected_pages()}
    finally:
        tab.close()
        server.shutdown()
    for r in results.values(): r["requests"] = [u.replace(base, "/")[:120] for u in r["requests"]]
    (SHOTS / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"\nbrowsed {len(results)} pages in {time.perf_counter() - t0:.0f} s; screenshots in {SHOTS}")
    return results


def test_every_page_loads_without_console_errors(browsed):
    bad = {page: r["errors"] for page, r in browsed.items() if r["errors"]}
    assert not bad, bad


def test_nothing_runs_past_the_content_column(browsed):
    "Wide tables scroll inside the page's column; no table, figure or code block is cut off at 1280 px."
    wide = {page: r["pastColumn"] for page, r in browsed.items() if r["pastColumn"]}
    assert not wide, f"past the content column (clipped in a 1280-px window): {wide}"
    assert all(r["pageWidth"] <= 1280 for r in browsed.values()), {p: r["pageWidth"] for p, r in browsed.items()}


def test_no_request_leaves_loopback(browsed):
    remote = {page: [u for u in r["requests"] if not u.startswith(("/", "data:", "blob:", "about:"))] for page, r in browsed.items()}
    assert not any(remote.values()), {p: u for p, u in remote.items() if u}


def test_equations_render_as_math(browsed):
    assert not {p: r["katexErrors"] for p, r in browsed.items() if r["katexErrors"]}
    assert not {p: r["rawMath"] for p, r in browsed.items() if r["rawMath"]}, "LaTeX left as text"
    assert all(r["math"] == "typeset" for r in browsed.values())
    method = ROOT / "docs/pages/01_method.py"
    assert browsed["method.html"]["katexDisplay"] == display_math_count(method) > 5
    assert browsed["losses.html"]["katexDisplay"] >= 3 and browsed["losses.html"]["katex"] > 20


def image_outputs(page: str) -> int:
    "Image outputs of shown cells in the page's executed notebook (from the build cache)."
    nb = nbformat.read(ROOT / "_proc/executed" / page.replace(".html", ".ipynb"), as_version=4)
    hidden = re.compile(r"^\s*#\|\s*(hide|export|exporti|default_exp)\b|^\s*#\|\s*(output|include):\s*false", re.M)
    return sum(1 for c in nb.cells if c.cell_type == "code" and not hidden.search(c.source)
               for o in c.outputs if any(k.startswith("image/") for k in o.get("data", {})))


def test_figures_appear(browsed):
    broken = {p: [i["src"] for i in r["images"] if not i["ok"]] for p, r in browsed.items()}
    assert not any(broken.values()), broken
    for page, r in browsed.items():
        assert len(r["figures"]) == image_outputs(page), f"{page}: {len(r['figures'])} figures shown, {image_outputs(page)} made"
    assert len(browsed["data_card.html"]["figures"]) >= 1 and sum(len(r["figures"]) for r in browsed.values()) >= 3


def test_results_pages_show_the_pipelines_tables(browsed):
    "The overview shows the report's headline table as a table; the report page its tables and figures."
    head = ROOT / "results/report/headline.md"
    if not head.is_file():
        assert "report.html" not in browsed
        return
    first_row = next(l for l in head.read_text().splitlines() if l.startswith("| RankCLIP "))
    cells = [c.strip() for c in first_row.strip("|").split("|")]
    shown = [t for t in browsed["index.html"]["tables"] if "RankCLIP" in t]
    assert shown and all(c in shown[0] for c in cells[1:]), (cells, shown[:1])
    report = browsed["report.html"]
    assert len(report["tables"]) >= 4 and len(report["figures"]) >= 4


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_screenshots_saved(browsed):
    for page, r in browsed.items():
        w, h = png_size(ROOT / r["screenshot"])
        assert w == 1280 and h >= 900 and (ROOT / r["screenshot"]).stat().st_size > 20_000, page
