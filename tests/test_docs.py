"""The documentation's code runs: every ```python block of docs/ and README.md, on a tiny model.

The convention (docs/contributing.md):

- A fenced block whose info string is exactly ``python`` is run; other fences (``bash``, ``yaml``,
  ``text``, ``pycon``...) are not.
- ``<!-- docs-test: skip (reason) -->`` on the line before a fence skips that block; the reason is
  required and is reported by ``test_skipped_blocks_give_a_reason``.
- The blocks of one page run in order in one namespace, in a fresh working folder.
- The embedded default model is replaced by a tiny random Llama with a byte tokenizer, and the
  default sentence embedder by the hashing embedder, so pages keep the code a reader would write
  (``BlackjackAgent()``) and the test takes seconds.
- Episode counts are cut before a block runs (see ``shorten``): ``range(N)`` with N >= 100 becomes
  ``range(16)``; ``n_episodes=`` / ``episodes=`` / ``eval_episodes=`` and the episode count of
  ``.train(env, N)`` / ``.evaluate(env, N)``, and ``"episodes": N`` in a dict, are at most 32,
  or at most N on a page that says
  ``<!-- docs-test: max-episodes N -->`` (for pages whose episodes are long). Everything else runs
  as written.
- The steps an on-policy policy head waits for (``OnPolicyConfig.auto_learning_starts``, 500) are
  cut to 16 the same way.
- A page that says ``<!-- docs-test: requires MODULE -->`` (an optional extra, such as
  ``textworld``) is skipped, with that reason, where the module is not installed.

A block that raises fails the test, with a traceback that points at the page and line.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import CHAT_TEMPLATE, make_tiny_lm, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>.*)$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b(?P<reason>.*?)-->\s*$")
REQUIRES = re.compile(r"^<!--\s*docs-test:\s*requires\s+([\w.]+)\s*-->\s*$", re.MULTILINE)
MAX_EPISODES = re.compile(r"^<!--\s*docs-test:\s*max-episodes\s+(\d+)\s*-->\s*$", re.MULTILINE)
LOOP_CAP = 16
EPISODE_CAP = 32


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    code: str
    info: str
    skip_reason: str | None  # None: runs

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the skip marker that precedes it (if any)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.match(prev)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        reason = marker["reason"].strip().strip("()").strip() if marker else None
        blocks.append(Block(path, i + 2, "\n".join(body) + "\n", info, reason))
        i = j + 1
    return blocks


def runnable(path: Path) -> list[Block]:
    return [b for b in extract_blocks(path) if b.info == "python" and b.skip_reason is None]


def _cap(value: str, cap: int, at_least: int = 0) -> str:
    number = int(value.replace("_", ""))
    return str(cap) if number >= max(at_least, cap) else value


def episode_cap(page: Path) -> int:
    m = MAX_EPISODES.search(page.read_text(encoding="utf-8"))
    return int(m[1]) if m else EPISODE_CAP


def shorten(code: str, cap: int = EPISODE_CAP) -> str:
    """Cut the episode counts of a snippet (see the module docstring)."""
    code = re.sub(r"\brange\((\d[\d_]*)\)", lambda m: f"range({_cap(m[1], LOOP_CAP, at_least=100)})", code)
    code = re.sub(r"\b(n_episodes|episodes|eval_episodes)(\s*=\s*)(\d[\d_]*)",
                  lambda m: f"{m[1]}{m[2]}{_cap(m[3], cap)}", code)
    code = re.sub(r"(([\"'])(?:n_episodes|episodes|eval_episodes)\2\s*:\s*)(\d[\d_]*)",
                  lambda m: f"{m[1]}{_cap(m[3], cap)}", code)
    code = re.sub(r"(\.(?:train|evaluate)\(\s*[\w.\[\]]+\s*,\s*)(\d[\d_]*)",
                  lambda m: f"{m[1]}{_cap(m[2], cap)}", code)
    return code


def test_shorten_cuts_episode_counts_only():
    code = ("for episode in range(1000):\n    pass\nfor i in range(8): pass\n"
            "agent.train(envs, n_episodes=2000)\nagent.evaluate(envs, 500, seed=10_000)\n"
            "RunConfig(episodes=640, segment_episodes=64, eval_episodes=200, eval_every=320)\n")
    assert shorten(code) == ("for episode in range(16):\n    pass\nfor i in range(8): pass\n"
                             "agent.train(envs, n_episodes=32)\nagent.evaluate(envs, 32, seed=10_000)\n"
                             "RunConfig(episodes=32, segment_episodes=64, eval_episodes=32, eval_every=320)\n")
    assert shorten('resume(d, overrides={"episodes": 704})') == 'resume(d, overrides={"episodes": 32})'
    assert shorten("agent.train(env, 64)\nagent.train(env, n_episodes=3)\n", cap=4) == (
        "agent.train(env, 4)\nagent.train(env, n_episodes=3)\n")


def test_extract_blocks_reads_fences_markers_and_lines(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# T\n\n```python\nx = 1\n```\n\n<!-- docs-test: skip (needs a GPU) -->\n```python\ny = 2\n```\n"
                    "- item:\n\n  ```python\n  z = 3\n  ```\n```bash\nls\n```\n")
    blocks = extract_blocks(page)
    assert [(b.line, b.code, b.info, b.skip_reason) for b in blocks] == [
        (4, "x = 1\n", "python", None), (9, "y = 2\n", "python", "needs a GPU"),
        (14, "z = 3\n", "python", None), (17, "ls\n", "bash", None)]


def test_skipped_blocks_give_a_reason():
    for page in PAGES:
        for block in extract_blocks(page):
            if block.skip_reason is not None:
                assert block.skip_reason, f"{block.where}: a docs-test skip marker needs a reason"


def test_every_page_with_python_runs_some():
    """A page of python blocks that are all skipped is probably a mistake."""
    for page in PAGES:
        blocks = [b for b in extract_blocks(page) if b.info == "python"]
        if blocks:
            assert runnable(page), f"{page.relative_to(ROOT)}: every python block is skipped"


# ---------------------------------------------------------------------------------------------- pages
@pytest.fixture(scope="module")
def tiny_default_model(tmp_path_factory):
    """A tiny random Llama and a byte tokenizer with a chat template, saved as a model folder."""
    path = tmp_path_factory.mktemp("docs-model")
    make_tiny_lm().save_pretrained(path)
    make_tokenizer(CHAT_TEMPLATE).save_pretrained(path)
    return path


@pytest.fixture
def docs_environment(tiny_default_model, tmp_path, monkeypatch):
    """What the pages' code runs in: a fresh folder, the tiny model as the default, no network."""
    import rllama.memory.episodic as episodic
    import rllama.policy.loading as loading
    from rllama.memory import HashingEmbedder

    real_make_embedder = episodic.make_embedder
    monkeypatch.setattr(loading, "default_model_path", lambda: tiny_default_model)
    monkeypatch.setattr(episodic, "make_embedder",
                        lambda spec: HashingEmbedder(384) if spec is None else real_make_embedder(spec))
    # Like the episode counts (shorten), the steps a policy head waits for before its first update.
    from rllama.algorithms import OnPolicyConfig

    monkeypatch.setattr(OnPolicyConfig, "auto_learning_starts", 16)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("RLLAMA_CACHE", str(tmp_path.parent / "docs-cache"))  # TextWorld games: once per session
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # `from examples... import ...` works as from the repository root
    # Pages register algorithms (docs/extending.md); what they register must not outlive the page.
    from rllama.algorithms import registry

    saved = dict(registry._REGISTRY)
    yield tmp_path
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def run_page(page: Path) -> None:
    # A real module, so that what needs one (dataclasses, pickling) works as in a script.
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(ROOT).with_suffix("")))
    module = types.ModuleType(name)
    sys.modules[name] = module
    cap = episode_cap(page)
    try:
        for block in runnable(page):
            code = "\n" * (block.line - 1) + shorten(block.code, cap)  # tracebacks show the page's line numbers
            exec(compile(code, str(page.relative_to(ROOT)), "exec"), module.__dict__)
    finally:
        del sys.modules[name]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page, docs_environment):
    import importlib.util

    for module in REQUIRES.findall(page.read_text(encoding="utf-8")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    run_page(page)


# ------------------------------------------------------------------------------- algorithm defaults
def defaults_table(page: Path) -> dict[str, object]:
    """The ``| `field` | `default` | ... |`` rows under a page's "## Defaults" heading."""
    text = page.read_text(encoding="utf-8")
    section = text.split("\n## Defaults\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `(\w+)` \| `([^`]*)` \|", line)
        if m:
            rows[m[1]] = ast.literal_eval(m[2])
    return rows


@pytest.mark.parametrize("name", ["ppo", "a2c", "reinforce", "grpo", "dqn", "sac"])
def test_algorithm_page_lists_the_config_defaults(name):
    from rllama.algorithms import get_algorithm_class

    config_class = get_algorithm_class(name).config_class
    expected = {f.name: f.default for f in dataclasses.fields(config_class)}
    assert defaults_table(ROOT / "docs" / "algorithms" / f"{name}.md") == expected


# ----------------------------------------------------------------------------------- site hooks
def test_included_markdown_rebases_links(tmp_path):
    """benchmarks/README.md inside docs/performance.md: figures link to the site's copies, other files become paths."""
    pytest.importorskip("mkdocs")
    import importlib.util

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "tools" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)

    class Files:
        def get_file_from_path(self, path):
            return object() if path in ("benchmarks/results/a.png", "memory.md") else None

    text = ("# Benchmarks\n\n![curve](results/a.png)\nSee [the script](memory.py), [memory](../docs/memory.md#x)"
            " and [Gymnasium](https://gymnasium.farama.org).\n\n```bash\n[not](a link)\n```\n")
    out = hooks.included_markdown(text, "benchmarks/README.md", "performance.md", Files())
    assert out == ("\n![curve](benchmarks/results/a.png)\n"
                   "See the script (`benchmarks/memory.py`), [memory](memory.md#x)"
                   " and [Gymnasium](https://gymnasium.farama.org).\n\n```bash\n[not](a link)\n```\n")


def test_the_quick_start_file_is_the_readme_quick_start():
    """examples/quickstart.py, whose time and memory the README states, runs the README's agent and loop."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert readme[readme.index("class BlackjackAgent(RLlamaAgent):"):readme.index("\n\n\nagent = ")] in example

    def code_lines(text: str) -> str:  # indentation and comments aside
        lines = (line.strip() for line in text.splitlines())
        return "\n".join(line for line in lines if line and not line.startswith("#"))

    start, end = readme.index("    done, total = False, 0.0"), readme.index('f"{agent.algorithm.num_updates} updates")')
    loop = readme[start:end]
    assert code_lines(loop) in code_lines(example)


def test_examples_run_as_scripts_from_the_repository_root():
    """`python examples/x.py` puts examples/ first on sys.path, not the root: an `examples.` import fails there
    unless the script puts the root on sys.path (as zoggian.py does), and a script named like a module it
    uses (textworld.py) shadows it unless the root replaces its folder."""
    import ast
    import importlib.util

    for path in sorted((ROOT / "examples").glob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        from_examples = [node.lineno for node in imports
                         if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "examples")
                         or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "examples"
                                                                  for a in node.names))]
        root_on_path = ("sys.path.insert(0, str(Path(__file__).resolve().parents[1]))" in text
                        or "sys.path[0] = str(Path(__file__).resolve().parents[1])" in text)
        if from_examples:
            assert root_on_path, f"{path.name} imports from examples (line {from_examples[0]}) but fails as a script"
        shadowed = importlib.util.find_spec(path.stem) if path.stem not in ("__init__",) else None
        if shadowed is not None and shadowed.origin != str(path):  # e.g. textworld.py and the textworld package
            assert "sys.path[0] = str(Path(__file__).resolve().parents[1])" in text, (
                f"{path.name} shadows the {path.stem} module when run as a script (its folder is first on sys.path)")
