"""Build the docs site from the notebooks, for reading offline.

    .venv/bin/python docs/build.py [--out _site] [--cache _proc] [--jobs 1] [--force]

Pages: nbs/index.ipynb first, then the pages in docs/pages/ (jupytext percent scripts), then every
notebook of nbs/ in file-name order, then the study report (nbs/experiments/report.ipynb) when an
executed copy with outputs exists. Each notebook is executed from its own folder in a fresh execnb shell of
the build's process, as nbdev-test runs them (cached in <cache>/executed/ by the hash of its cells and of
the rankclip package), processed with nbdev's docs processors (show_doc API cards, links; cached in
<cache>/processed/) and rendered by nbconvert with the template in docs/templates/site/. KaTeX
comes from npm (pinned, sha256-checked) and is served from the site itself: no page loads anything
from another host.
"""
import argparse, hashlib, json, os, re, shutil, subprocess, sys, tarfile, tempfile, time
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
KATEX = dict(package="katex", version="0.19.1",
             sha256="24da5a599eb2fcede2e270b99a6ff48bca816beecc95feeb84e8cccbd1bb34fd",
             files=["dist/katex.min.js", "dist/katex.min.css", "dist/contrib/auto-render.min.js", "dist/fonts/*",
                    "LICENSE"])
REPORT = "experiments/report.ipynb"
REPORT_EXECUTED = ["results/report.ipynb", "results/report/report.ipynb"]
KERNEL = "python3"


@dataclass
class Page:
    "One page of the site: its source, the html file it becomes, and whether the build executes it."
    src: Path
    out: str
    execute: bool = True

    @property
    def key(self) -> str: return Path(self.out).stem


def html_name(src: Path) -> str:
    "The page's html file name, as nbdev names it (numeric prefix dropped: 09_losses -> losses.html)."
    from nbdev.config import nbpath2html
    return nbpath2html(Path(src.name)).name


def has_outputs(path: Path) -> bool:
    return any(c.get("outputs") for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def site_pages(root: Path = ROOT) -> tuple[list[Page], list[str]]:
    "The site's pages in navigation order, and the reasons for the pages left out."
    nbs, skipped = root / "nbs", []
    hidden = lambda p: any(part.startswith(("_", ".")) for part in p.relative_to(nbs).parts)
    notebooks = sorted((p for p in nbs.glob("*.ipynb") if not hidden(p)), key=lambda p: (p.name != "index.ipynb", p.name))
    if not notebooks or notebooks[0].name != "index.ipynb":
        raise SystemExit(f"docs: {nbs}/index.ipynb is missing: it is the overview page")
    pages = [Page(notebooks[0], "index.html")]
    pages += [Page(p, html_name(p)) for p in sorted((root / "docs" / "pages").glob("*.py"))]
    pages += [Page(p, html_name(p)) for p in notebooks[1:]]
    report = nbs / REPORT
    executed = [p for p in [report, *(root / r for r in REPORT_EXECUTED)] if p.is_file() and has_outputs(p)]
    if executed: pages.append(Page(executed[0], "report.html", execute=False))
    elif report.is_file(): skipped.append(f"{report.relative_to(root)}: no executed copy with outputs (run `make repro` first)")
    names = [p.out for p in pages]
    if len(set(names)) < len(names):
        raise SystemExit(f"docs: two pages would both be written as {sorted({n for n in names if names.count(n) > 1})}; rename one")
    return pages, skipped


def read_page(page: Page):
    "The page's source as a notebook (jupytext percent scripts for docs/pages/*.py)."
    if page.src.suffix == ".py":
        import jupytext
        nb = jupytext.read(page.src, fmt="py:percent")
        nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": KERNEL}}
        return nb
    return nbformat.read(page.src, as_version=4)


def sha256(*parts) -> str:
    h = hashlib.sha256()
    for p in parts: h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()


def library_hash(root: Path = ROOT) -> str:
    """Hash of the rankclip package sources and of the study's report tables (the overview page shows the headline):
    executed notebooks go stale when either changes."""
    files = sorted((root / "rankclip").rglob("*.py")) + sorted((root / "results" / "report").glob("*.md"))
    return sha256(*(f"{f.relative_to(root)}\0".encode() + f.read_bytes() for f in files))


def exec_key(nb, lib: str) -> str:
    cells = [(c.cell_type, c.source) for c in nb.cells]
    return sha256(json.dumps(cells), lib, KERNEL, "execnb")


def cached(path: Path, key: str):
    "The cached notebook at `path` if it was made from `key`, else None."
    if not path.is_file(): return None
    nb = nbformat.read(path, as_version=4)
    return nb if nb.metadata.get("rankclip_docs", {}).get("key") == key else None


def write_nb(nb, path: Path, key: str):
    "Write `nb` with its cache key, atomically."
    nb.metadata["rankclip_docs"] = {"key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)


def run_in_process(nb, cwd: Path):
    """Execute `nb` from the folder `cwd` in a fresh execnb shell of this process, as `nbdev-test` does: each notebook gets
    its own namespace, and the modules it imports (torch, transformers, rankclip) load once per build instead of once per
    notebook in a new kernel. Raises SystemExit with the notebook's traceback on the first error.

    What earlier notebooks left (the imported libraries: some 800,000 objects) is moved out of the cyclic garbage
    collector's reach first (`gc.freeze`); every full collection walked it, and nbs/22_report_stats.ipynb took 20.5 s
    after nbs/13_gpu_path.ipynb instead of 2.7 s."""
    import gc
    from execnb.shell import CaptureShell
    from fastcore.nbio import dict2nb, nb2dict
    gc.collect()
    gc.freeze()
    before, run = os.getcwd(), dict2nb(nb)
    os.chdir(cwd)
    shell = CaptureShell(path=cwd)
    try:
        shell.run_all(run, exc_stop=True)
    except Exception:  # the notebook's error; an interrupt (Ctrl-C) stays an interrupt
        raise SystemExit(shell.prettytb()[-3000:]) from None
    finally:
        shell.close()
        os.chdir(before)
    return nbformat.from_dict(nb2dict(run))


def execute(page: Page, cache: Path, lib: str, force: bool = False) -> tuple[Path, float | None]:
    "Execute the page's notebook from its folder (or reuse the cached run); the executed copy and seconds taken."
    nb, dst = read_page(page), cache / "executed" / f"{page.key}.ipynb"
    if not page.execute:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page.src, dst)
        return dst, None
    key = exec_key(nb, lib)
    if not force and cached(dst, key) is not None: return dst, None
    cwd = page.src.parent if page.src.suffix == ".ipynb" else ROOT / "nbs"
    t0 = time.perf_counter()
    try:
        nb = run_in_process(nb, cwd)
    except SystemExit as e:
        raise SystemExit(f"docs: {page.src.relative_to(ROOT)} failed while executing (the same error shows in "
                         f"`nbdev-test {page.src.relative_to(ROOT)}`):\n{e}") from None
    write_nb(nb, dst, key)
    return dst, time.perf_counter() - t0


def split_title_cell(nb):
    """Keep only `# title` and the `> description` lines in the first markdown cell.

    nbdev's frontmatter processor consumes the whole first markdown cell and keeps the first description
    line only; the rest of that cell moves to a cell of its own and the description is joined.
    """
    first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), None)
    if first is None: return nb
    lines = nb.cells[first].source.splitlines()
    title = [l for l in lines if re.match(r"#\s+\S", l)][:1]
    if not title: return nb
    desc = [l.lstrip(">").strip() for l in lines if l.startswith(">")]
    rest = "\n".join(l for l in lines if l not in title and not l.startswith(">")).strip()
    nb.cells[first].source = "\n".join(title + ([f"> {' '.join(desc)}"] if desc else []))
    if rest: nb.cells.insert(first + 1, nbformat.v4.new_markdown_cell(rest))
    return nb


def api_cell(cell) -> bool:
    "Does nbdev need to run this cell to render the API: an export or show_doc cell, or one of imports only?"
    import ast
    if cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}: return True
    trees = cell.parsed_() or []
    calls = [t for t in trees if isinstance(t, ast.Expr) and isinstance(t.value, ast.Call)]
    if trees and len(calls) == len(trees) and all(getattr(c.value.func, "id", "") == "show_doc" for c in calls): return True
    return bool(trees) and all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in trees)


def top_level_imports(cell) -> str:
    "The cell's top-level import statements alone (the names later API cards may need)."
    import ast
    return "\n".join(ast.unparse(t) for t in (cell.parsed_() or []) if isinstance(t, (ast.Import, ast.ImportFrom)))


def docs_filter():
    """nbdev's docs processors, with `exec_show_docs` running only the cells the API cards need.

    nbdev re-executes every cell that contains an import; a cell mixing imports with code that uses
    earlier results then fails, and it repeats work the full run already did. Here such a cell runs
    only its import statements, and keeps the outputs of the full run.
    """
    from nbdev.processors import FilterDefaults, exec_show_docs

    class exec_api_docs(exec_show_docs):
        def __call__(self, cell):
            if cell.cell_type == "code" and cell.source and not api_cell(cell):
                if getattr(self.nb, "has_docs_", False) and hasattr(self, "k") and (imports := top_level_imports(cell)):
                    self.k.run_cell(imports)
                return
            return super().__call__(cell)

    class DocsFilter(FilterDefaults):
        def base_procs(self): return [exec_api_docs if p is exec_show_docs else p for p in super().base_procs()]
    return DocsFilter


def nbdev_process(jobs: list[tuple[str, str]]):
    "nbdev's docs processors on executed notebooks, `(src, dst)` pairs; run from nbs/ as nbdev-proc-nbs is."
    import nbdev.serve_drv
    for src, dst in jobs:
        nbformat.write(split_title_cell(nbformat.read(src, as_version=4)), dst)
        nbdev.serve_drv.main((Path(dst), Path(dst), docs_filter()))


def process(executed: list[Path], cache: Path, jobs: int, force: bool = False) -> list[Path]:
    "nbdev-process the executed notebooks in `jobs` subprocesses (cached by the executed notebook's hash)."
    out, todo = [], []
    for src in executed:
        dst, key = cache / "processed" / src.name, sha256(src.read_bytes(), "nbdev-3")
        out.append(dst)
        if force or cached(dst, key) is None: todo.append((src, dst, key))
    if not todo: return out
    (cache / "processed").mkdir(parents=True, exist_ok=True)
    tmp = {src: dst.with_name(dst.name + ".tmp.ipynb") for src, dst, _ in todo}
    chunks = [todo[i::max(1, jobs)] for i in range(max(1, jobs))]
    procs = [subprocess.Popen([sys.executable, __file__, "--nbdev-process", *(str(p) for s, _, _ in c for p in (s, tmp[s]))],
                              cwd=ROOT / "nbs") for c in chunks if c]
    if any(p.wait() for p in procs): raise SystemExit("docs: nbdev's processing failed (see above)")
    for src, dst, key in todo:
        write_nb(nbformat.read(tmp[src], as_version=4), dst, key)
        tmp[src].unlink()
    return out


def fetch_katex(cache: Path) -> Path:
    "KaTeX's dist files from npm (pinned version, sha256-checked), unpacked under <cache>/katex-<version>/."
    dest = cache / f"katex-{KATEX['version']}"
    if (dest / "katex.min.js").is_file(): return dest
    tgz = cache / f"katex-{KATEX['version']}.tgz"
    if not tgz.is_file() or sha256(tgz.read_bytes()) != KATEX["sha256"]:
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run(["npm", "pack", f"katex@{KATEX['version']}", "--silent"], cwd=d, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"docs: `npm pack katex@{KATEX['version']}` failed ({r.stderr.strip()[-300:]}); "
                                 "the build needs the npm registry once to vendor KaTeX")
            got = Path(d) / r.stdout.strip().splitlines()[-1]
            digest = sha256(got.read_bytes())
            if digest != KATEX["sha256"]:
                raise SystemExit(f"docs: katex-{KATEX['version']}.tgz has sha256 {digest}, expected {KATEX['sha256']} "
                                 "(the registry served different bytes; check before changing the pin in docs/build.py)")
            shutil.move(got, tgz)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(tgz) as tar:
        import fnmatch
        members = [m for m in tar.getmembers() if m.isfile() and any(fnmatch.fnmatch(m.name, f"package/{p}") for p in KATEX["files"])]
        tar.extractall(tmp, members=members, filter="data")
    for m in members:
        rel = Path(m.name).relative_to("package")
        target = tmp / "flat" / (rel.relative_to("dist") if rel.parts[0] == "dist" else rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(tmp / m.name, target)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp / "flat", dest)
    shutil.rmtree(tmp)
    return dest


_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")
_SOURCE_LINK = re.compile(r"\[source\]\(/blob/[^/)]+/(rankclip/[\w/]+\.py)#L(\d+)\)(\{[^}]*\})?")


def quarto_to_tags(cell):
    "Quarto's `#| echo/output/include: false` cell options (left by nbdev) as nbconvert removal tags."
    lines, opts = cell.source.splitlines(), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        opts[m.group(1)] = m.group(2).strip("'\"").lower()
        lines.pop(0)
    cell.source = "\n".join(lines)
    tags = set(cell.metadata.get("tags", []))
    if opts.get("echo") == "false": tags.add("remove-input")
    if opts.get("output") == "false": tags.add("remove-output")
    if opts.get("include") == "false": tags.add("remove-cell")
    if tags: cell.metadata["tags"] = sorted(tags)


def source_links(md: str) -> str:
    "show_doc's `[source](/blob/main/rankclip/x.py#L58){...}` as a link to the site's source page."
    return _SOURCE_LINK.sub(lambda m: f'<a class="source-link" href="src/{Path(m.group(1)).name}.html#L-{m.group(2)}">source</a>', md)


def prepare_for_html(nb, drop_stderr: bool = False):
    """The processed notebook as nbconvert wants it: frontmatter out, nbformat-valid cells, Quarto options as tags;
    with `drop_stderr`, no stderr streams (the study report's page: warnings stay in its committed notebook)."""
    fm = {}
    if nb.cells and nb.cells[0].cell_type == "raw" and nb.cells[0].source.lstrip().startswith("---"):
        import yaml
        fm = yaml.safe_load(nb.cells.pop(0).source.strip().strip("-")) or {}
    cells = []
    for c in nb.cells:
        c = nbformat.from_dict({k: v for k, v in c.items() if k in ("cell_type", "source", "metadata", "outputs", "execution_count", "id", "attachments")})
        if c.cell_type == "markdown" and "AUTOGENERATED" in c.source: continue
        c.metadata = {k: v for k, v in c.metadata.items() if k == "tags"}
        if c.cell_type == "code": quarto_to_tags(c)
        if c.cell_type == "code" and drop_stderr:
            c.outputs = [o for o in c.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        if c.cell_type == "markdown": c.source = source_links(c.source)
        for o in c.get("outputs", []):
            if "text/markdown" in o.get("data", {}): o.data["text/markdown"] = source_links(o.data["text/markdown"])
        cells.append(c)
    nb.cells = cells
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("rankclip_docs", None)
    return nb, fm


def rewrite_links(text: str, pages: list[Page]) -> str:
    "Site-root links (`/losses.html`, nbdev's) as relative ones, and links to notebooks as links to their pages."
    by_nb = {p.src.name: p.out for p in pages}
    def fix(m):
        url = m.group(2)
        if url.startswith("/") and not url.startswith("//"): url = url[1:]
        path, sep, frag = url.partition("#")
        if path in by_nb: url = by_nb[path] + sep + frag
        return f'{m.group(1)}"{url}"'
    return re.sub(r'(href=)"([^"]*)"', fix, text)


def exporter():
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_cell_tags = {"remove-cell"}
    c.TagRemovePreprocessor.remove_input_tags = {"remove-input"}
    c.TagRemovePreprocessor.remove_all_outputs_tags = {"remove-output"}
    c.HTMLExporter.exclude_input_prompt = True
    c.HTMLExporter.exclude_output_prompt = True
    return HTMLExporter(config=c, template_name="site", extra_template_basedirs=[str(DOCS / "templates")])


def render(page: Page, processed: Path, pages: list[Page], titles: dict, ex) -> str:
    "One page's html: the processed notebook through the site template, links made relative."
    nb, fm = prepare_for_html(nbformat.read(processed, as_version=4), drop_stderr=page.out == "report.html")
    title, desc = page_title(read_page(page), page)
    i = [p.out for p in pages].index(page.out)
    nav = [{"href": p.out, "title": titles[p.out], "current": p.out == page.out} for p in pages]
    site = {"nav": nav, "title": title, "description": desc,
            "prev": nav[i - 1] if i > 0 else None, "next": nav[i + 1] if i + 1 < len(nav) else None}
    nb.metadata["title"] = title if page.out == "index.html" else f"{title} - rankclip"
    body, _ = ex.from_notebook_node(nb, resources={"site": site})
    return rewrite_links(body, pages)


def page_title(nb, page: Page) -> tuple[str, str]:
    "Title and description from the first markdown cell's `# title` and `> description` lines."
    md = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    title = re.search(r"^#\s+(.+?)\s*$", md, re.M)
    desc = " ".join(l.lstrip(">").strip() for l in md.splitlines() if l.startswith(">"))
    return (title.group(1) if title else page.src.stem), desc


def render_sources(out: Path, root: Path = ROOT):
    "Each module of the package as a highlighted page with line anchors (`src/losses.py.html#L-58`)."
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    (out / "src").mkdir(parents=True, exist_ok=True)
    for f in sorted((root / "rankclip").glob("*.py")):
        if f.name == "_modidx.py": continue
        fmt = HtmlFormatter(full=True, linenos="inline", lineanchors="L", anchorlinenos=True, title=f"rankclip/{f.name}")
        (out / "src" / f"{f.name}.html").write_text(highlight(f.read_text(), PythonLexer(), fmt))


def build(out: Path = ROOT / "_site", cache: Path = ROOT / "_proc", jobs: int = 1, force: bool = False) -> dict:
    "Build the site into `out` (replaced atomically); returns timings and skipped pages."
    t0 = time.perf_counter()
    pages, skipped = site_pages()
    cache.mkdir(parents=True, exist_ok=True)
    katex = fetch_katex(cache)
    lib = library_hash()
    executed, timings = [], {}
    for page in pages:
        path, secs = execute(page, cache, lib, force)
        executed.append(path)
        timings[page.out] = secs
        print(f"docs: {page.src.relative_to(ROOT)}: " + ("cached" if secs is None else f"executed in {secs:.1f} s"), flush=True)
    t_exec = time.perf_counter()
    processed = process(executed, cache, jobs, force)
    t_proc = time.perf_counter()
    titles = {p.out: page_title(read_page(p), p)[0] for p in pages}
    titles["index.html"] = "Overview"
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=out.parent))
    ex = exporter()
    for page, proc in zip(pages, processed):
        (tmp / page.out).write_text(render(page, proc, pages, titles, ex))
    shutil.copytree(katex, tmp / "_static" / "katex")
    for f in (DOCS / "static").iterdir(): shutil.copy(f, tmp / "_static" / f.name)
    render_sources(tmp)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists(): os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    t_end = time.perf_counter()
    return {"pages": [p.out for p in pages], "skipped": skipped, "executed": timings,
            "seconds": {"execute": t_exec - t0, "process": t_proc - t_exec, "render": t_end - t_proc, "total": t_end - t0}}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--nbdev-process"]: return nbdev_process(list(zip(argv[1::2], argv[2::2])))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "_site"), help="site folder (default: _site)")
    ap.add_argument("--cache", default=str(ROOT / "_proc"), help="executed and processed notebooks (default: _proc)")
    ap.add_argument("--jobs", type=int, default=1, help="processes for the nbdev step (default: 1)")
    ap.add_argument("--force", action="store_true", help="execute and process every notebook again")
    a = ap.parse_args(argv)
    res = build(Path(a.out).resolve(), Path(a.cache).resolve(), a.jobs, a.force)
    s = res["seconds"]
    print(f"docs: {len(res['pages'])} pages in {a.out} ({s['total']:.0f} s: execute {s['execute']:.0f}, "
          f"nbdev {s['process']:.0f}, render {s['render']:.0f}); open {Path(a.out) / 'index.html'}")
    print(f"docs: {len(res['skipped'])} page(s) skipped" + "".join(f"\n  {r}" for r in res["skipped"]))


if __name__ == "__main__":
    main()
