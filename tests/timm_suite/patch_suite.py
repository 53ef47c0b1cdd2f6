"""Adapt timm's own ``tests/`` (from the sdist of the installed timm) to select the zoo's models.

Run by ``run.sh``; edits the unpacked copy in place, never the installed timm:

* ``conftest.py`` imports ``zoo``, so that timm's ``list_models`` (evaluated at collection) lists
  the ``zoo_*`` models;
* ``test_models.py``'s filter lists get our models where timm lists its own models of that kind:
  ``NON_STD_FILTERS`` the token-sequence models (those whose ``forward_features`` returns
  (B, N, C) tokens, read from the models: ViT, DeiT, gMLP, WideNet, CvT, CCT, ViT-Lite, compact
  CVT; timm lists its ``vit_*``, ``deit*`` and ``gmlp_*`` there), each family's token layout
  written beside it in the patched file (``token_layouts``); CAFormer returns maps as timm's does
  (``ModelSpec.features_as_map``) and takes the standard tests,
  ``FEAT_INTER_FILTERS`` the timm module names our families register under (every zoo model has
  ``forward_intermediates`` and a getter-style ``features_only``), and the exclusion lists the
  tests timm itself would skip for a model of that kind, each with its reason (EXCLUSIONS below).

Every anchor is looked up exactly; a timm release that renames one fails here, loudly, rather than
running a suite that silently selects nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path


def token_output_patterns() -> list[str]:
    """The zoo models whose ``forward_features`` returns tokens ``(B, N, C)`` (their last stage works
    on token sequences): timm's NON_STD_FILTERS holds its own vit_*, deit*, gmlp_*, ... for the same
    reason. Read from the models (built on the meta device), not typed: ``zoo_<family>_*`` where a
    whole family does, else the names."""
    import zoo

    tokens: dict[str, list[bool]] = {}
    names = zoo.list_models()
    for name in names:
        tokens.setdefault(name.split("_")[1], []).append(_token_output(name))
    patterns = [f"zoo_{family}_*" for family, flags in tokens.items() if all(flags)]
    mixed = {family for family, flags in tokens.items() if any(flags) and not all(flags)}
    patterns += [name for name in names if name.split("_")[1] in mixed and _token_output(name)]
    return patterns


def _token_output(name: str) -> bool:
    import zoo

    model = zoo.create_model(name, device="meta")
    return model.stages[-1].layout == "nlc" and not model.spec.features_as_map


def token_layouts(patterns: list[str]) -> list[str]:
    """One line per token-output pattern: what its ``forward_features`` returns, read from its first
    model (prefix tokens first, then the H*W patch tokens row by row; what its pooling reads)."""
    import fnmatch

    import zoo

    lines = []
    for pattern in patterns:
        name = next(n for n in zoo.list_models() if fnmatch.fnmatch(n, pattern))
        model = zoo.create_model(name, device="meta")
        stage, pool = model.stages[-1], model.spec.global_pool
        prefix = " + ".join(t for t, on in (("class", stage.spec.class_token), ("dist", stage.spec.dist_token)) if on)
        tokens = f"{prefix} + H*W" if prefix else "H*W"
        lines.append(f"{pattern}: forward_features (B, {tokens}, C), pooled by {pool!r}")
    return lines


# (anchor in test_models.py, patterns, reason): tests timm itself excludes for a model of that kind,
# the way it excludes hiera_*, *naflex* and gemma4_vit* from scripting (forwards TorchScript cannot
# compile) and *huge* models from the prune-at-every-index test. An anchor that opens a list gets the
# patterns at its start; the scripting test's filter (not EXCLUDE_JIT_FILTERS, which timm's
# FX-then-script test also reads) gets a list of its own added.
EXCLUSIONS: list[tuple[str, list[str], str]] = [
    (
        "list_models(exclude_filters=EXCLUDE_FILTERS + EXCLUDE_JIT_FILTERS, name_matches_cfg=True)",
        ["zoo_*"],
        "test_model_forward_torchscript: torch.jit.script is refused by design, in one line "
        "(ZooModel.__prepare_scriptable__): the blocks train through torch.autograd.Function and read Python "
        "spec objects; torch.jit.trace / torch.export / python -m zoo.export are the supported exports "
        "(tests/test_pretrained_io.py::test_export_round_trip), and an FX trace scripts (below)",
    ),
    (
        "EXCLUDE_FX_JIT_FILTERS = [",
        ["zoo_widenet*"],
        "FX keeps the MoE as a leaf module (it routes tokens by value), and scripting it compiles its Python "
        "routing statistics (dict expansion), which TorchScript cannot; every other family scripts after FX",
    ),
    (
        # (the anchor runs to the test's name: the features test above it has the same parametrize line)
        "module=FEAT_INTER_FILTERS, exclude_filters=EXCLUDE_FILTERS))\n@pytest.mark.parametrize('batch_size', [1])\n"
        "def test_model_forward_intermediates(",
        ["zoo_cct_2_3x2_32"],
        "test_model_forward_intermediates asserts at least 3 feature levels; CCT-2/3x2 has 2 blocks, so 2 taps "
        "(an isotropic model's taps are its blocks, as timm's ViTs'); its intermediates are checked by "
        "test_model_forward_intermediates_features and test_prune_intermediate_layers_contract",
    ),
    (
        "exclude_filters=EXCLUDE_FILTERS + ['*huge*',",
        ["zoo_widenet_h"],
        "test_prune_intermediate_layers_contract: WideNet-H is ViT-H's width (1280, 32 taps), one of the "
        "*huge* models timm leaves out of this test (it took 1299 s of a 2426 s run on 2 cores)",
    ),
]


def _insert(text: str, anchor: str, items: list[str], comment: str) -> str:
    if text.count(anchor) != 1:
        raise SystemExit(
            f"timm suite: {anchor!r} not found exactly once in test_models.py; "
            "this timm release changed its layout: update tests/timm_suite/patch_suite.py"
        )
    listed = "".join(f"{item!r}, " for item in items)
    if "EXCLUDE_FILTERS))\n" in anchor:  # a decorator's exclude list, closed: add ours to it
        ours = anchor.replace("EXCLUDE_FILTERS))", f"EXCLUDE_FILTERS + [\n    # zoo: {comment}\n    {listed}]))", 1)
        return text.replace(anchor, ours, 1)
    if anchor.endswith(("[", ",")):
        return text.replace(anchor, f"{anchor}\n    # zoo: {comment}\n    {listed}", 1)
    head, tail = anchor.rsplit(", ", 1)  # filters + [ours], the call's last argument
    return text.replace(anchor, f"{head} + [\n    # zoo: {comment}\n    {listed}], {tail}", 1)


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
    non_std = token_output_patterns()
    layouts = "".join(f"\n    #   {line}" for line in token_layouts(non_std))
    text = _insert(
        text,
        "NON_STD_FILTERS = [",
        non_std,
        f"token-sequence features (B, N, C), like timm's vit_*, deit*, gmlp_*:{layouts}",
    )
    for anchor, patterns, reason in EXCLUSIONS:
        text = _insert(text, anchor, patterns, reason)
    path.write_text(text)
    print(f"timm suite: timm {timm.__version__}'s tests on zoo from {Path(zoo.__file__).parent}")
    print(
        f"timm suite: patched {path} (FEAT_INTER_FILTERS += {modules}; NON_STD_FILTERS += {non_std}; "
        f"{len(EXCLUSIONS)} exclusion(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
