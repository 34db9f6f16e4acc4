"""The documentation: the site builds with `mkdocs build --strict`, every runnable snippet of README.md and docs/
runs, and the README stays a short, true front page.

Snippet convention: every fenced ```python block of README.md and docs/**/*.md runs, unless the line just before
its fence starts with `<!-- not-run` (say why: `<!-- not-run: needs a GPU -->`). The blocks of one page run in
order in one namespace (a page may build on its earlier blocks), each page in a fresh one; a line
`--8<-- "path"` inside a block is replaced by that file, as pymdownx.snippets does for the site.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted(p for p in (ROOT / "docs").rglob("*.md"))]
NOT_RUN = "<!-- not-run"
INCLUDE = re.compile(r'\s*--8<-- "(.+)"\s*')
BANNED = re.compile(r"\b(session|sessions|issue|issues|team|teams)\b", re.IGNORECASE)


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """`(line, code, runnable)` of every ```python block of `path`, with snippet includes expanded."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            runnable = not (i > 0 and lines[i - 1].strip().startswith(NOT_RUN))
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                include = INCLUDE.fullmatch(lines[i])
                body.append((ROOT / include.group(1)).read_text() if include else lines[i])
                i += 1
            blocks.append((start + 1, "\n".join(body), runnable))
        i += 1
    return blocks


def _environment() -> dict:
    return {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
            "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def site_build(tmp_path_factory):
    """`mkdocs build --strict`, started at once so that it runs while the snippets do."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site = tmp_path_factory.mktemp("site")
    process = subprocess.Popen([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                               cwd=ROOT, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    yield process, site
    if process.poll() is None:
        process.kill()


def test_snippets_run(site_build, tmp_path):
    pages = {str(p.relative_to(ROOT)): [(line, code) for line, code, runnable in python_blocks(p) if runnable]
             for p in PAGES}
    pages = {name: blocks for name, blocks in pages.items() if blocks}
    assert len(pages) >= 15 and sum(map(len, pages.values())) >= 30  # the convention finds the snippets
    runner = tmp_path / "run_snippets.py"
    runner.write_text(textwrap.dedent(f"""
        import traceback, warnings
        warnings.simplefilter("ignore")
        failed = []
        for page, blocks in {pages!r}.items():
            namespace = {{"__name__": "__main__"}}
            for line, code in blocks:
                try:
                    exec(compile(code, f"{{page}}:{{line}}", "exec"), namespace)
                except BaseException:
                    failed.append(page)
                    print(f"FAILED {{page}}, block at line {{line}}:\\n{{traceback.format_exc()}}")
                    break
        raise SystemExit(f"snippets failed in: {{', '.join(failed)}}" if failed else 0)
    """))
    result = subprocess.run([sys.executable, str(runner)], cwd=ROOT, env=_environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


def test_mkdocs_build_strict(site_build):
    process, site = site_build
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    assert (site / "api" / "index.html").is_file()
    api = (site / "api" / "index.html").read_text()
    for name in ("dst_prune.apply", "dst_prune.DynamicSparsity", "dst_prune.load_sparse_state_dict",
                 "dst_prune.pruned_state_dict", "dst_prune.register_method", "dst_prune.DropAndGrow",
                 "dst_prune.SparseAlgorithm", "dst_prune.DSTError", "dst_prune.integrations.hf.DSTCallback",
                 "dst_prune.integrations.lightning.DSTCallback", "dst_prune.integrations.timm.SparseCheckpointSaver",
                 "dst_prune.training.checkpoints.load_checkpoint", "dst_prune.DynamicSparsity.state_dict",
                 "dst_prune.DynamicSparsity.load_state_dict", "dst_prune.DynamicSparsity.sum_table",
                 "dst_prune.DynamicSparsity.add_copy"):
        assert f'id="{name}"' in api, name
    assert 'id="integrations.' not in api  # every object under the path users import it by
    algorithms = (site / "algorithms" / "index.html").read_text()
    assert "<!-- method defaults -->" not in algorithms and "drop_fraction=0.3" in algorithms
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    assert "<!-- table:" not in benchmarks and benchmarks.count("measured on") >= 5


def test_every_page_is_in_the_nav_and_the_own_method_example_is_included():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in config, f"{page} is not in mkdocs.yml's nav"
    extending = python_blocks(ROOT / "docs" / "extending.md")
    assert any("register_method(\"saliency_rigl\")" in code and runnable for _, code, runnable in extending)


def test_readme_is_a_short_front_page_of_the_project():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert not BANNED.findall(text), BANNED.findall(text)
    for link in re.findall(r"\]\(([^)#]+)\)", text):  # relative links point at files of the checkout
        if "://" not in link:
            assert (ROOT / link).exists(), link
    assert "source .venv/bin/activate" in text and "--index-url https://download.pytorch.org/whl/cpu" in text


def test_readme_commands_exist_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    commands = set(re.findall(r"`make ([a-z][a-z-]*)`", README.read_text()))
    assert {"run", "test"} <= commands and commands <= targets, commands - targets
    run = re.search(r"^run:.*\n\t(.+)$", makefile, re.MULTILINE).group(1)
    assert "scripts/train.py" in run
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_shows_what_make_run_prints():
    """The sum table of `make run` is fixed by the model and the budget; the summary line is train.py's format."""
    import dst_prune
    from dst_prune.training.models import create_model

    text = README.read_text()
    output = re.search(r"`make run` ends with.*?```text\n(.*?)```", text, re.DOTALL).group(1)
    model = create_model("lenet_300_100", num_classes=10, in_chans=1, img_size=8)  # the digits, as train.py builds
    dst = dst_prune.apply(model, sparsity=0.9)
    assert str(dst.sum_table) in output
    rows = dict(re.findall(r"^\| (\S+) +\| +(\d+) \| +\d+ \| +[\d.]+ \|$", output, re.MULTILINE))
    assert rows == {t.name: str(t.orig.numel()) for t in dst.targets}
    nonzero = [int(n) for n in re.findall(r"^\| \S+ +\| +\d+ \| +(\d+) \|", output, re.MULTILINE)]
    assert sum(nonzero) == dst.budget
    assert re.search(r"^lenet_300_100 on digits: validation accuracy 0\.\d{4} at sparsity 0\.9000 \(dsr\) after 1320 "
                     r"steps, 6 reallocations; outputs in runs/digits-lenet_300_100-dsr-0\.9$", output, re.MULTILINE)
    script = (ROOT / "scripts" / "train.py").read_text()
    assert "validation accuracy {summary['val_accuracy']:.4f} at sparsity" in script


def test_readme_shows_apply_as_it_is():
    """The signature in the README's API section is `dst_prune.apply`'s: the same names, kinds and defaults."""
    import inspect

    import dst_prune

    shown = re.search(r"^dst = dst_prune\.apply\((model, \*, .*?)\)\n```", README.read_text(),
                      re.MULTILINE | re.DOTALL).group(1)
    namespace: dict = {}
    exec(f"def apply({shown}):\n    pass", namespace)
    expected = [(p.name, p.kind, p.default) for p in inspect.signature(dst_prune.apply).parameters.values()]
    assert [(p.name, p.kind, p.default) for p in inspect.signature(namespace["apply"]).parameters.values()] == expected


def test_every_test_the_docs_name_exists():
    """docs/reliability.md (and other pages) name the test behind each guarantee: each must be a real test."""
    named = set()
    for page in PAGES:
        text = page.read_text()
        for file, tests in re.findall(r"`(?:tests/)?(test_\w+\.py)((?:::\w+)?)`", text):
            named.add((file, tests[2:]))
        for file, first, rest in re.findall(r"`(?:tests/)?(test_\w+\.py)::(\w+)`((?:, `::\w+`)*)", text):
            named.update((file, name) for name in [first, *re.findall(r"::(\w+)", rest)])
    assert len(named) > 40
    for file, name in sorted(named):
        source = (ROOT / "tests" / file)
        assert source.is_file(), file
        if name:
            assert re.search(rf"^def {name}\b", source.read_text(), re.MULTILINE), f"{file}::{name}"
