"""The documentation's code runs: every ``python`` block in README.md and docs/ is executed
on the test models (``pg.Model.default()`` is SmolLM2-135M), each in a fresh namespace
with ``parallel_gen`` imported as ``pg``, in a temporary directory.

A block that talks to the server or a Ray cluster the page just started carries ``<!--
needs: server -->`` or ``<!-- needs: ray -->`` on the line before its fence: the test
starts that component for real (``parallel-gen serve`` on the default model with the key in
``key.txt``, answering where the docs say, http://127.0.0.1:8000, through the port it got;
a local Ray cluster and a ``reviews.parquet`` of short reviews, ``model.gguf`` standing for
the default model) and runs the block against it.

A block that cannot run on the test models alone (a file of the reader's own, a fragment
that continues another) carries ``<!-- illustrative: REASON -->`` on the line before its
fence: it is reported as a skip naming its file, line and reason (``pytest -rs`` lists
them), never skipped silently. A marker without a reason, or one not followed by a python
block, fails.
The site itself is built with ``mkdocs build --strict`` by ``make docs`` (.ci/run).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

import parallel_gen as pg
from parallel_gen import model_files

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"^<!--\s*illustrative\b:?\s*(?P<reason>.*?)\s*-->$")
NEEDS = re.compile(r"^<!--\s*needs:\s*(?P<what>server|ray)\s*-->$")
DOCS_URL = "http://127.0.0.1:8000"   # where the docs' server answers
DOCS_MODEL = '"model.gguf"'           # the docs' stand-in for a model file
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[\w+-]*)")
README_MAX_LINES = 220


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    illustrative: Optional[str]  # the marker's reason; None: the block runs
    needs: Optional[str] = None  # "server" or "ray": the test starts it for the block

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> List[Block]:
    """The fenced code blocks of a markdown file, with the illustrative marker before each."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group("fence"), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(prev)
        reason = marker.group("reason") if marker else None
        needs = NEEDS.match(prev)
        blocks.append(Block(path, start + 1, m.group("info").lower(), "\n".join(lines[start + 1 : j]), reason,
                            needs.group("what") if needs else None))
        i = j + 1
    return blocks


def markers(path: Path) -> List[int]:
    """Lines holding an illustrative marker, outside code blocks (an example of a marker
    inside a fence is text, not a marker)."""
    inside = {b.line + k for b in code_blocks(path) for k in range(b.code.count("\n") + 2)}
    lines = path.read_text(encoding="utf-8").split("\n")
    return [n + 1 for n, l in enumerate(lines)
            if n + 1 not in inside and (MARKER.match(l.strip()) or NEEDS.match(l.strip()))]


ALL_BLOCKS = [b for f in DOC_FILES for b in code_blocks(f)]
PY_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]


@pytest.fixture(scope="module")
def docs_server():
    """The docs' server: `parallel-gen serve` on the default model, any model name accepted."""
    from test_server import KEY, Server

    server = Server(model_files.default_model_path(), "--n-parallel", "4", key=KEY, names=("model",))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def docs_ray():
    import ray

    if not ray.is_initialized():  # more logical CPUs than cores: the readers' tasks beside the actors
        ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _prepared(block: Block, request: pytest.FixtureRequest) -> str:
    """The block's code, pointed at the component its marker asks for (started here)."""
    code = block.code
    if block.needs == "server":
        server = request.getfixturevalue("docs_server")
        Path("key.txt").write_text(server.key + "\n")
        assert DOCS_URL in code, f"{block.where}: a server block talks to {DOCS_URL}"
        code = code.replace(DOCS_URL, server.url)
    elif block.needs == "ray":
        import pandas as pd

        request.getfixturevalue("docs_ray")
        pd.DataFrame({"review": ["Loved it!", "Awful.", "Fine, I guess.", "Best book this year."]}).to_parquet(
            "reviews.parquet")
        assert DOCS_MODEL in code, f"{block.where}: a Ray block names {DOCS_MODEL}"
        code = code.replace(DOCS_MODEL, repr(str(model_files.default_model_path())))
    return code


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.where for b in PY_BLOCKS])
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           request: pytest.FixtureRequest) -> None:
    if block.illustrative is not None:
        pytest.skip(f"illustrative ({block.where}): {block.illustrative}")
    # the data files the tests ship, at the paths the docs name from the repository's root
    shutil.copytree(ROOT / "tests" / "data", tmp_path / "tests" / "data")
    monkeypatch.chdir(tmp_path)
    code = _prepared(block, request)
    namespace = {"__name__": "__docs__", "pg": pg}
    exec(compile(code, block.where, "exec"), namespace)


def test_markers_are_well_formed() -> None:
    problems = []
    for f in DOC_FILES:
        py_lines = {b.line for b in code_blocks(f)
                    if b.lang in ("python", "py") and (b.illustrative is not None or b.needs is not None)}
        for b in code_blocks(f):
            if b.illustrative == "":
                problems.append(f"{b.where}: illustrative marker without a reason")
        for n in markers(f):
            # the marker must sit right before (blank lines aside) a python block's fence
            if not any(line > n and all(not l.strip() for l in f.read_text().split("\n")[n : line - 1])
                       for line in py_lines):
                problems.append(f"{f.relative_to(ROOT)}:{n}: marker not followed by a python block")
    assert not problems, "\n".join(problems)


def test_readme_examples_run_on_the_default_model() -> None:
    """The README's examples are runnable ones, written against pg.Model.default()."""
    readme = [b for b in PY_BLOCKS if b.file.name == "README.md" and b.file.parent == ROOT]
    runnable = [b for b in readme if b.illustrative is None and b.needs is None]
    assert len(runnable) >= 4, [b.where for b in readme]
    assert all("pg.Model.default(" in b.code for b in runnable), [b.where for b in runnable]
    assert model_files.default_model_path().exists()


def test_readme_is_short() -> None:
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: move details into docs/"


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def test_readme_links_resolve() -> None:
    """mkdocs --strict checks docs/'s links; the README's relative links are checked here."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    bad = []
    for m in LINK.finditer(text):
        target = m.group("target").split("#")[0]
        if not target or re.match(r"^[a-z]+:", target):
            continue
        if not (ROOT / target).exists():
            bad.append(m.group("target"))
    assert not bad, f"README.md links to missing files: {bad}"


def test_api_reference_lists_every_public_name() -> None:
    """docs/reference.md has a mkdocstrings entry for each name parallel_gen exports."""
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: parallel_gen\.(?:[\w.]+\.)?(\w+)$", reference, re.M))
    missing = sorted(set(pg.__all__) - documented)
    assert not missing, f"public names without an API reference entry in docs/reference.md: {missing}"


def test_block_parser_sees_markers_and_nested_fences(tmp_path: Path) -> None:
    """The parser the tests above rely on: a marker binds to the next block only, and a
    four-backtick fence holds a three-backtick one without ending."""
    md = tmp_path / "x.md"
    md.write_text(
        "<!-- illustrative: needs a server -->\n```python\na = 1\n```\n\n```python\nb = 2\n```\n"
        "````markdown\n```python\nc = 3\n```\n````\n",
        encoding="utf-8",
    )
    blocks = code_blocks(md)
    assert [(b.lang, b.code, b.illustrative) for b in blocks] == [
        ("python", "a = 1", "needs a server"),
        ("python", "b = 2", None),
        ("markdown", "```python\nc = 3\n```", None),
    ]
    md.write_text("<!-- needs: server -->\n```python\na = 1\n```\n<!-- needs: a pony -->\n```python\nb = 2\n```\n",
                  encoding="utf-8")
    assert [(b.needs, b.illustrative) for b in code_blocks(md)] == [("server", None), (None, None)]
