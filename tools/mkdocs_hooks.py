"""MkDocs hooks of the documentation site (mkdocs.yml: ``hooks``).

- Files outside ``docs/`` that the site shows: the benchmark figures ``benchmarks/results/*.png``
  are added to the site as ``benchmarks/results/<name>.png``.
- ``<!-- docs: include PATH -->`` on a line of its own is replaced by the Markdown file ``PATH``
  (relative to the repository root) without its first-level title. Its relative links are rebased:
  to a file the site has (a figure), the link points there; to another file of the repository, the
  link becomes the file's path in code font (the site holds only ``docs/``). A missing file is an
  error, so the strict build fails on it.
- Math (``$...$`` and ``$$...$$``, marked by ``pymdownx.arithmatex``) is converted to MathML when
  the site is built (``latex2mathml``), which browsers render natively: no JavaScript, no network.
  A formula that does not convert is an error.
"""

from __future__ import annotations

import html
import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = "benchmarks/results"
INCLUDE = re.compile(r"^<!-- docs: include (?P<path>\S+) -->[ \t]*$", re.MULTILINE)
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
MATH = re.compile(r'<(?P<tag>span|div) class="arithmatex">(?P<tex>.*?)</(?P=tag)>', re.DOTALL)


def on_files(files, config):
    for path in sorted((ROOT / FIGURES).glob("*.png")):
        files.append(File.generated(config, f"{FIGURES}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    def include(match: re.Match) -> str:
        rel = match["path"]
        path = ROOT / rel
        if not path.is_file():
            raise PluginError(f"{page.file.src_uri}: '<!-- docs: include {rel} -->': no file {rel}")
        return included_markdown(path.read_text(encoding="utf-8"), rel, page.file.src_uri, files)

    return INCLUDE.sub(include, markdown)


def on_page_content(content, page, config, files):
    from latex2mathml.converter import convert

    def mathml(match: re.Match) -> str:
        tex = html.unescape(match["tex"]).strip()
        display = match["tag"] == "div"
        if tex[:2] in ("\\(", "\\[") and tex[-2:] in ("\\)", "\\]"):
            tex = tex[2:-2]
        try:
            out = convert(tex, display="block" if display else "inline")
        except Exception as exc:
            raise PluginError(f"{page.file.src_uri}: cannot convert the formula {tex!r} to MathML: {exc}") from exc
        if "<merror" in out:
            raise PluginError(f"{page.file.src_uri}: the formula {tex!r} converts to a MathML error")
        return f'<div class="math">{out}</div>' if display else out

    return MATH.sub(mathml, content)


def included_markdown(text: str, rel: str, page_uri: str, files) -> str:
    """``text`` (the file ``rel``) as it appears inside the page ``page_uri``."""
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    base = posixpath.dirname(rel)
    page_dir = posixpath.dirname(page_uri)
    out, in_fence = [], False
    for line in lines:
        if FENCE.match(line.strip()):
            in_fence = not in_fence
        if not in_fence:
            line = LINK.sub(lambda m: _rebase(m, base, page_dir, files), line)
        out.append(line)
    return "\n".join(out) + "\n"


def _rebase(match: re.Match, base: str, page_dir: str, files) -> str:
    target = match["target"]
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        return match[0]  # an absolute URL or an anchor of the same page
    path, _, anchor = target.partition("#")
    repo_path = posixpath.normpath(posixpath.join(base, path))
    if repo_path.startswith("docs/"):
        repo_path = repo_path[len("docs/"):]  # a page of this site
    if files.get_file_from_path(repo_path) is not None:
        new = posixpath.relpath(repo_path, page_dir or ".") + (f"#{anchor}" if anchor else "")
        return f"{match['bang']}[{match['text']}]({new})"
    return f"{match['text']} (`{repo_path}`)"
