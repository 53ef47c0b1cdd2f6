"""No figure typed by hand in README.md or docs/: every measured number comes from a results file.

The rule this test enforces (and what it lets through):

* Checked: README.md and every ``docs/**/*.md``, after removing
  - the generated blocks: ``<!-- results:NAME -->`` ... ``<!-- /results -->`` (copied from
    ``zoo/bench/results/NAME.md`` by ``python -m zoo.bench readme``) and ``<!-- generated:NAME -->``
    ... ``<!-- /generated -->`` (computed by ``zoo/bench/generated.py``);
  - fenced code blocks and inline code spans (commands, config values, code and its output);
  - HTML comments and link targets (URLs, paths).
* A **measured figure** is a number (digits, optionally with thousands commas and decimals, optionally
  after ``~``) followed by one of these units or words:
  - a percentage: ``%``;
  - a duration: ``ms``, ``s``, ``sec``, ``seconds``, ``min``, ``minutes``, ``h``, ``hours``;
  - a throughput: ``img/s``, ``images/s``, ``tokens/s``, ``it/s``, ``samples/s``, ``steps/s``;
  - a ratio: ``x`` ending the word (``1.1x``, ``5x``; not ``32x32`` or ``3x3``, which are sizes);
  - memory: ``B``, ``kB``, ``KB``, ``MB``, ``GB``, ``TB``, ``KiB``, ``MiB``, ``GiB``;
  - counts of tests: ``passed``, ``failed``, ``skipped``, ``xfailed``, ``xpassed``, ``errors``,
    ``deselected``, ``tests``;
  - differences: ``points``, ``pp``, or a ``±`` between numbers;
  - parameter counts: ``M parameters``, ``M params``, ``M-parameter``.
* Allowed: versions (``timm 1.0.31``), years and paper citations (``Dodge et al. 2019``), sizes and
  settings without those units (``batch 32``, ``224x224``, ``4 experts``), anything in code, and a
  published figure on a line that cites its source with an external link (``... 96.5 % on CIFAR-10
  ([paper](https://arxiv.org/abs/...))``): a citation, not our measurement.

A figure of ours belongs in a results file written by a bench or study command, shown through a
results block; prose points at it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_BLOCKS = re.compile(r"<!-- (results|generated):[\w.-]+ -->\n.*?<!-- /\1 -->", re.DOTALL)
_FENCES = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
_COMMENTS = re.compile(r"<!--.*?-->", re.DOTALL)
_CODE = re.compile(r"(`+).+?\1", re.DOTALL)
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_NUMBER = r"(?<![\w.])~?\d[\d,]*(?:\.\d+)?"
_UNITS = (
    r"\s?%",
    r"\s?(?:ms|s|sec|seconds?|min|minutes?|h|hours?)\b",
    r"\s?(?:img|images|tokens|it|samples|steps)/s\b",
    r"x(?![\w])",
    r"\s?(?:B|kB|KB|MB|GB|TB|KiB|MiB|GiB)\b",
    r"\s(?:passed|failed|skipped|xfailed|xpassed|errors?|deselected|tests)\b",
    r"\s(?:points?|pp)\b",
    r"\s?±\s?\d",
    r"\s?M[ -]param(?:eter)?s?\b",
)
FIGURE = re.compile(_NUMBER + "(?:" + "|".join(_UNITS) + ")")
_CITATION = re.compile(r"\]\(https?://")


def _blank(m: re.Match) -> str:
    """The match replaced by as many newlines as it held, so line numbers stay right."""
    return "\n" * m.group(0).count("\n")


def typed_figures(text: str) -> list[tuple[int, str]]:
    """(line number, figure) for every measured figure in ``text`` outside the allowed places."""
    for pattern in (_BLOCKS, _FENCES, _COMMENTS):
        text = pattern.sub(_blank, text)
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if _CITATION.search(line):
            continue
        prose = _LINK_TARGET.sub("]", _CODE.sub("", line))
        found += [(number, m.group(0).strip()) for m in FIGURE.finditer(prose)]
    return found


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def check_tree(root: Path) -> list[str]:
    """``path:line: figure`` for every typed figure of the README and docs under ``root``."""
    return [
        f"{doc.relative_to(root)}:{line}: {figure!r}"
        for doc in documents(root)
        for line, figure in typed_figures(doc.read_text())
    ]


def test_the_readme_and_docs_hold_no_typed_figure():
    found = check_tree(REPO)
    assert not found, "figures typed by hand (put them in a results file and a results block):\n" + "\n".join(found)


PLANTED = [
    "It trains to 99.0 % in 123 s.",
    "The suite: 1,098 passed, 1 skipped.",
    "PoolFormer-S12 trains at 1.1x timm's speed.",
    "About 1,650 img/s on this CPU.",
    "weights/ holds 29.0 MB.",
    "The difference is 2.7 ± 2.2 points.",
    "A 1 M-parameter PoolFormer.",
    "It took 55 min of CPU time.",
    "Error fell by 1.5 pp.",
]


@pytest.mark.parametrize("sentence", PLANTED)
def test_a_planted_figure_in_a_copy_of_the_tree_is_found(tmp_path, sentence):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    shutil.copy(REPO / "README.md", root / "README.md")
    for doc in (REPO / "docs").rglob("*.md"):
        target = root / "docs" / doc.relative_to(REPO / "docs")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(doc, target)
    assert check_tree(root) == []  # the copy passes, as the tree does
    page = root / "docs" / "training.md"
    page.write_text(page.read_text() + f"\n{sentence}\n")
    found = check_tree(root)
    assert len(found) >= 1 and all(f.startswith("docs/training.md:") for f in found), found


@pytest.mark.parametrize(
    "text",
    [
        "<!-- results:speed -->\n| a | 1.10x | 99.0 % |\n<!-- /results -->\n",
        "<!-- generated:headline -->\n- 99.0 % in 123 s\n<!-- /generated -->\n",
        "```\n110 passed, 18348 deselected in 174.01s\n```\n",
        "Run `pytest --timeout 600s` or set `train.epochs=40`.\n",
        "timm 1.0.31, torch 2.14.1, Dodge et al. 2019, batch 32 at 224x224, 3x3 pooling, 4 experts.\n",
        "CCT-7/3x1 reaches 96.5 % on CIFAR-10 ([Hassani et al. 2021](https://arxiv.org/abs/2104.05704)).\n",
        "See [the table](results.md#speed) and <!-- a comment with 5 % -->.\n",
    ],
)
def test_generated_code_and_cited_figures_are_allowed(text):
    assert typed_figures(text) == []


def test_line_numbers_point_at_the_figure():
    text = "# t\n\n```\ncode 1 s\n```\n\n<!-- results:x -->\n5 %\n<!-- /results -->\nprose 3 s here\n"
    assert typed_figures(text) == [(10, "3 s")]
