"""Adapt timm's own ``tests/`` (from the sdist of the installed timm) to select the zoo's models.

Run by ``run.sh``; edits the unpacked copy in place, never the installed timm:

* ``conftest.py`` imports ``zoo``, so that timm's ``list_models`` (evaluated at collection) lists
  the ``zoo_*`` models;
* ``test_models.py``'s filter lists get our models where timm lists its own models of that kind:
  ``NON_STD_FILTERS`` the token-sequence models (ViT, DeiT, gMLP, WideNet, CvT: their
  ``forward_features`` returns (B, N, C) tokens, as timm's ``vit_*``, ``deit*`` and ``gmlp_*``),
  ``FEAT_INTER_FILTERS`` the timm module names our families register under (every zoo model has
  ``forward_intermediates`` and a getter-style ``features_only``), and the exclusion lists the
  tests timm itself would skip for a model of that kind, each with its reason (EXCLUSIONS below).

Every anchor is looked up exactly; a timm release that renames one fails here, loudly, rather than
running a suite that silently selects nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Token-sequence models: timm's NON_STD_FILTERS holds its own vit_*, deit*, gmlp_*, ... for the same reason.
NON_STD = ["zoo_vit*", "zoo_deit*", "zoo_gmlp*", "zoo_widenet*", "zoo_cvt*"]

# (list name in test_models.py, patterns, reason): tests timm itself excludes for a model of that kind,
# the way it excludes hiera_*, *naflex* and gemma4_vit* from scripting (forwards TorchScript cannot compile).
EXCLUSIONS: list[tuple[str, list[str], str]] = [
    (
        "EXCLUDE_JIT_FILTERS",
        ["zoo_*"],
        "torch.jit.script is refused by design, in one line (ZooModel.__prepare_scriptable__): the blocks train "
        "through torch.autograd.Function and read Python spec objects; torch.jit.trace / torch.export / "
        "python -m zoo.export are the supported exports (tests/test_pretrained_io.py::test_export_round_trip)",
    ),
    (
        "EXCLUDE_FX_JIT_FILTERS",
        ["zoo_widenet*"],
        "FX keeps the MoE as a leaf module (it routes tokens by value), and scripting it compiles its Python "
        "routing statistics (dict expansion), which TorchScript cannot; every other family scripts after FX",
    ),
]


def _insert(text: str, anchor: str, items: list[str], comment: str) -> str:
    if text.count(anchor) != 1:
        raise SystemExit(
            f"timm suite: {anchor!r} not found exactly once in test_models.py; "
            "this timm release changed its layout: update tests/timm_suite/patch_suite.py"
        )
    listed = "".join(f"{item!r}, " for item in items)
    return text.replace(anchor, f"{anchor}\n    # zoo: {comment}\n    {listed}", 1)


def main(tests_dir: str) -> int:
    import timm

    import zoo

    tests = Path(tests_dir)
    conftest = tests / "conftest.py"
    text = conftest.read_text()
    if "import zoo" not in text:
        conftest.write_text("import zoo  # noqa: F401  (registers the zoo_* models in timm)\n" + text)

    # the timm module names our families register under (zoo.models.vit -> 'vit', ...)
    modules = sorted({timm.models.model_entrypoint(n).__module__.rsplit(".", 1)[-1] for n in zoo.list_models()})
    path = tests / "test_models.py"
    text = path.read_text()
    if "# zoo:" in text:
        return 0  # patched already
    text = _insert(
        text,
        "FEAT_INTER_FILTERS = [",
        modules,
        "modules of the zoo families (forward_intermediates, getter-style features_only)",
    )
    text = _insert(
        text, "NON_STD_FILTERS = [", NON_STD, "token-sequence features (B, N, C), like timm's vit_*, deit*, gmlp_*"
    )
    for name, patterns, reason in EXCLUSIONS:
        text = _insert(text, f"{name} = [", patterns, reason)
    path.write_text(text)
    print(f"timm suite: timm {timm.__version__}'s tests on zoo from {Path(zoo.__file__).parent}")
    print(
        f"timm suite: patched {path} (FEAT_INTER_FILTERS += {modules}; NON_STD_FILTERS += {NON_STD}; "
        f"{len(EXCLUSIONS)} exclusion(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
