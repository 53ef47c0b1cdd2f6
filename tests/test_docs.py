"""The README and docs/: the first screen, the generated blocks up to date, every relative link live."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import zoo
from zoo.bench import fresh, generated, report

REPO = Path(__file__).resolve().parents[1]
DOCS = report.documents(REPO / "README.md")
_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_FENCES = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCES.sub("", doc.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(doc: Path) -> list[str]:
    return [m["target"] for m in _LINK.finditer(_FENCES.sub("", doc.read_text()))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no file {file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_the_link_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some section\n")
    doc = tmp_path / "README.md"
    doc.write_text("[ok](docs/a.md#some-section) [gone](docs/b.md) [bad](docs/a.md#nope)\n")
    assert links(doc) == ["docs/a.md#some-section", "docs/b.md", "docs/a.md#nope"]
    assert anchors(tmp_path / "docs" / "a.md") == {"a-page", "some-section"}
    assert slug("The README's commands") == "the-readmes-commands"


def test_the_first_screen():
    """The two commands first, then what the zoo is, the examples, the model table and the headline,
    all within the first 60 lines."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert fresh.readme_commands(REPO / "README.md")[:2] == [
        "pip install -e . && python train_vision.py",
        'pip install -e ".[dev]" && pytest',
    ]
    assert lines[2] == "```bash" and lines[3].startswith("pip install -e . &&")
    first_screen = "\n".join(lines[:60])
    for needle in ("zoo.create_model(", "train_vision.py --config", "python -m zoo.study sweep"):
        assert needle in first_screen, needle
    for block in ("models", "headline"):
        assert f"<!-- generated:{block} -->" in first_screen
    end = max(i for i, line in enumerate(lines) if line == "<!-- /generated -->")
    assert end < 60, f"the headline ends on line {end + 1}"
    assert not re.search(r"\b[0-9a-f]{7,40}\b", "\n".join(lines)), (
        "a commit hash in the README (history: docs/changelog.md)"
    )


def test_the_blocks_match_their_results_files_and_generators():
    """Every results and generated block of README and docs/ as `python -m zoo.bench readme` writes
    it; the model tables are checked by name here (fast) and in full by the slow test below."""
    skip = frozenset({"models", "models_full"})
    stale = {doc.name: report.sync_file(doc, report.RESULTS, check=True, skip=skip) for doc in DOCS}
    assert not any(stale.values()), f"stale blocks {stale}: run python -m zoo.bench readme"
    text = "".join(doc.read_text() for doc in DOCS)
    names = set(re.findall(r"`(zoo_\w+)`", _block(text, "models_full")))
    assert names == set(zoo.list_models()), "the model table is stale: run python -m zoo.bench readme"
    families = {generated.FAMILIES[_family(n)].title for n in zoo.list_models()}
    assert all(title in _block(text, "models") for title in families)


def test_every_results_file_is_shown_in_the_docs():
    """Each results table is in a results block of its own name or in a generated block that shows
    every file of its bench (``zoo.bench.generated.TABLE_PREFIXES``)."""
    text = "".join(doc.read_text() for doc in DOCS)
    shown = set(re.findall(r"<!-- results:([\w.-]+) -->", text))
    prefixes = [p for name, (p, _) in generated.TABLE_PREFIXES.items() if f"<!-- generated:{name} -->" in text]
    missing = [
        md.name
        for md in sorted(report.RESULTS.glob("*.md"))
        if md.stem not in shown and not md.stem.startswith(tuple(prefixes))
    ]
    assert not missing, f"results files no page shows (add a results block to docs/results.md): {missing}"


def _block(text: str, name: str) -> str:
    m = re.search(rf"<!-- generated:{name} -->\n(.*?)<!-- /generated -->", text, re.DOTALL)
    assert m, f"no generated block {name!r} in README/docs"
    return m[1]


def _family(name: str) -> str:
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


@pytest.mark.slow
def test_the_model_tables_match_the_registry():
    stale = {doc.name: report.sync_file(doc, report.RESULTS, check=True) for doc in DOCS}
    assert not any(stale.values()), f"stale blocks {stale}: run python -m zoo.bench readme"


def test_docs_blocks_get_links_rebased(tmp_path):
    """A results file's links are relative to the repository root; in docs/ they point one level up."""
    res = tmp_path / "results"
    res.mkdir()
    (res / "t.md").write_text("![plot](zoo/bench/results/t.png) [web](https://x.org) [here](#a)\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "p.md"
    page.write_text("# p\n\n<!-- results:t -->\n<!-- /results -->\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:t -->\nold\n<!-- /results -->\n")
    assert report.documents(readme) == [readme, page]
    assert report.main(["--readme", str(readme), "--results", str(res), "--check"]) == 1
    assert report.sync_file(page, res, root=tmp_path) == ["t"]
    assert "![plot](../zoo/bench/results/t.png) [web](https://x.org) [here](#a)" in page.read_text()
    assert report.sync_file(readme, res, root=tmp_path) == ["t"]
    assert "![plot](zoo/bench/results/t.png)" in readme.read_text()
    assert report.sync_file(page, res, root=tmp_path, check=True) == []


def test_a_missing_results_file_reads_not_measured_yet_with_its_command(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:first_run -->\n<!-- /results -->\n<!-- results:nothing -->\n<!-- /results -->\n")
    with pytest.raises(FileNotFoundError, match="nothing"):
        report.sync_file(readme, tmp_path)
    readme.write_text("<!-- results:first_run -->\n<!-- /results -->\n")
    assert report.sync_file(readme, tmp_path) == ["first_run"]
    assert "Not measured yet: `python -m zoo.bench first-run`" in readme.read_text()


@pytest.mark.slow  # builds PoolFormer-S12 twice: seconds on a quiet machine, more on a shared one
def test_the_readme_python_example_runs():
    """The first screen's "load a backbone" example, executed as written."""
    block = re.search(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.DOTALL | re.MULTILINE)
    assert block, "no python example in the README"
    namespace: dict = {}
    exec(compile(block[1], "README.md", "exec"), namespace)
    assert namespace["model"].num_classes == 10 and len(namespace["feats"].feature_info) == 4
    assert namespace["digits"].pretrained_cfg["tag"] == "mnist5k"
