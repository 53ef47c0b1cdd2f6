"""The README's and docs' blocks that are computed, not measured: the model table (from the registry
and weights/manifest.json) and the headline (a few lines read from the results files).

Each sits between ``<!-- generated:NAME -->`` and ``<!-- /generated -->`` and is rewritten by
``python -m zoo.bench readme`` like a results block (``--check`` compares). Links in the text are
relative to the repository root; ``zoo.bench.report`` rebases them for a file in a sub-folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    title: str  # with the paper link(s)
    exactness: str  # what the tests compare the family against


# Keyed by the module a family's models register from (zoo/models/<module>.py; timm's resnet module
# for the baselines). A new family file needs a row here: models_table refuses a module it lacks.
FAMILIES: dict[str, Family] = {
    "poolformer": Family(
        "[PoolFormer](https://arxiv.org/abs/2111.11418)",
        "timm's `poolformer_*` weights and the official sail-sg layout give the same logits",
    ),
    "metaformer": Family(
        "[MetaFormer baselines](https://arxiv.org/abs/2210.13452)",
        "timm's PoolFormerV2 / ConvFormer / CAFormer weights and the official layout give the same logits",
    ),
    "vit": Family(
        "[ViT](https://arxiv.org/abs/2010.11929) / [DeiT](https://arxiv.org/abs/2012.12877)",
        "timm's `vit_*` / `deit_*` weights and the official DeiT layout give the same logits",
    ),
    "cvt": Family(
        "[CvT](https://arxiv.org/abs/2103.15808)",
        "the official microsoft/CvT checkpoints against a re-implementation of the official code",
    ),
    "cct": Family(
        "[CCT / ViT-Lite / compact CVT](https://arxiv.org/abs/2104.05704)",
        "the official SHI-Labs/Compact-Transformers code",
    ),
    "gmlp": Family("[gMLP](https://arxiv.org/abs/2105.08050)", "timm's `gmlp_*` weights give the same logits"),
    "widenet": Family(
        "[WideNet](https://arxiv.org/abs/2107.11817)",
        "structure: shared attention and MoE, per-block norms (no public weights to compare)",
    ),
    "resnet": Family("ResNet baselines (timm's own, unchanged)", "timm itself"),
}
SHOWN_BASELINES = ("resnet10t", "resnet18", "resnet50")  # the README's rows; BASELINES lists them all


def _names_cell(names: list[str]) -> str:
    """``zoo_caformer_{s18,m36}``: names grouped by their first two words, sorted."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        parts = name.split("_")
        head, tail = ("_".join(parts[:2]), "_".join(parts[2:])) if name.startswith("zoo_") else (name, "")
        groups.setdefault(head, []).append(tail)
    cells = []
    for head, tails in groups.items():
        tails = [t for t in tails if t]
        cells.append(f"`{head}_{{{','.join(tails)}}}`" if len(tails) > 1 else f"`{'_'.join([head, *tails])}`")
    return ", ".join(cells)


def _shipped_cell(tagged: list[str]) -> str:
    """``zoo_{caformer,convformer}_mini_32.mnist5k``: shipped names (``name.tag``) that differ only in
    their family word, grouped."""
    groups: dict[str, list[str]] = {}
    for item in sorted(tagged):
        parts = item.split("_")
        if item.startswith("zoo_") and len(parts) > 2:
            groups.setdefault("_".join(parts[2:]), []).append(parts[1])
        else:
            groups.setdefault(item, [])
    cells = []
    for tail, words in groups.items():
        if not words:
            cells.append(f"`{tail}`")
        else:
            word = words[0] if len(words) == 1 else "{" + ",".join(words) + "}"
            cells.append(f"`zoo_{word}_{tail}`")
    return ", ".join(cells) or "-"


def model_rows() -> list[dict[str, Any]]:
    """Every registered zoo model and the shown baselines: family module, parameters (at the default
    head, built on the meta device, nothing allocated) and the shipped weights' tag."""
    import timm

    import zoo
    from zoo.models.pretrained import read_manifest
    from zoo.models.registry import _shipped_tag

    manifest = read_manifest()
    rows = []
    for name in [*zoo.list_models(), *SHOWN_BASELINES]:
        module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        if module not in FAMILIES:
            raise KeyError(f"model {name}: family module {module!r} has no row in zoo.bench.generated.FAMILIES")
        model = zoo.create_model(name, device="meta")
        entry = manifest.get(name)
        rows.append(
            {
                "name": name,
                "family": module,
                "params": sum(p.numel() for p in model.parameters()),
                "shipped": f"{name}.{_shipped_tag(entry)}" if entry else "",
            }
        )
    return rows


def models_table(rows: list[dict[str, Any]]) -> str:
    """One row a family: its paper, its names, the range of their parameter counts, what exactness
    is tested against, and the weights weights/ ships."""
    out = [
        "| family | names | params (M) | exactness tested against | shipped weights |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for module, fam in FAMILIES.items():
        members = [r for r in rows if r["family"] == module]
        if not members:
            continue
        params = [r["params"] / 1e6 for r in members]
        span = f"{min(params):.1f}-{max(params):.1f}" if len(params) > 1 else f"{params[0]:.1f}"
        shipped = _shipped_cell([r["shipped"] for r in members if r["shipped"]])
        out.append(
            f"| {fam.title} | {_names_cell([r['name'] for r in members])} | {span} | {fam.exactness} | {shipped} |"
        )
    return "\n".join(out) + "\n"


def models_full_table(rows: list[dict[str, Any]]) -> str:
    """One row a model (docs/models.md)."""
    out = ["| model | family | params (M) | shipped weights |", "| --- | --- | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (list(FAMILIES).index(r["family"]), r["name"])):
        shipped = f"`{r['shipped']}`" if r["shipped"] else "-"
        out.append(f"| `{r['name']}` | {r['family']} | {r['params'] / 1e6:.2f} | {shipped} |")
    return "\n".join(out) + "\n"


def _load(results: Path, stem: str) -> dict[str, Any] | None:
    path = results / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(data: dict[str, Any]) -> str:
    return f"{data.get('cpu_model', '?')} ({data.get('cpu_capability', '?')})"


def _suite_counts(row: dict[str, Any]) -> str:
    keys = ("passed", "failed", "errors", "skipped", "xfailed")
    return ", ".join(f"{row[k]} {k}" for k in keys if row.get(k))


def headline(results: Path) -> str:
    """A few lines, each from one results file and linking to its section; a missing file gives a
    line naming the command that writes it."""
    lines = []
    run = _load(results, "first_run")
    if run:
        r = run["rows"][0]
        lines.append(
            f"- **The first command** from a fresh clone: `{r['model']}` reaches {r['top1']:.1f} % top-1 on "
            f"{r['dataset']} in {r['wall_s']:.0f} s with the install, {r['train_s']:.0f} s of it training "
            f"({r['precision']}, {_machine(run)}). "
            "[More](docs/results.md#the-readmes-commands)"
        )
    else:
        lines.append("- **The first command**: not measured yet (`python -m zoo.bench first-run` writes it).")
    suite = _load(results, "suite")
    if suite:
        r = suite["rows"][0]
        lines.append(
            f"- **The second command** from a fresh clone: {_suite_counts(r)} in {r['wall_s']:.0f} s "
            f"({_machine(suite)}). [More](docs/reliability.md#the-test-suite)"
        )
    else:
        lines.append("- **The second command**: not measured yet (`python -m zoo.bench suite` writes it).")
    timm_suite = _load(results, "timm_suite")
    if timm_suite:
        r = timm_suite["rows"][0]
        lines.append(
            f"- **timm's own model tests** on every zoo model: {_suite_counts(r)} ({_machine(timm_suite)}). "
            "[More](docs/reliability.md#timms-own-tests-on-zoo-models)"
        )
    weights = _load(results, "weights_check")
    if weights:
        top1 = [r["measured"] for r in weights["rows"]]
        lines.append(
            f"- **Shipped weights**: {len(top1)} models, {min(top1):.1f}-{max(top1):.1f} % top-1 on MNIST-5k "
            "(re-measured in float32). [Table](docs/results.md#shipped-weights)"
        )
    speed = _speed_spread(results)
    if speed:
        lines.append(speed)
    return "\n".join(lines) + "\n"


def _speed_spread(results: Path) -> str | None:
    """The range of train-step ratios against timm's twin at its best layout, eager, per CPU met
    (newest run first)."""
    runs = []
    for path in results.glob("speed_*.json"):
        data = json.loads(path.read_text())
        ratios = [r["train_ratio"] for r in data.get("rows", []) if r.get("train_ratio") and not r.get("compiled")]
        if ratios:
            runs.append((data.get("date", ""), _machine(data), ratios))
    if not runs:
        return None
    by_machine: dict[str, list[float]] = {}
    for _, machine, ratios in sorted(runs, reverse=True):
        by_machine.setdefault(machine, []).extend(ratios)
    spans = "; ".join(f"{min(v):.2f}-{max(v):.2f}x on {m}" for m, v in by_machine.items())
    return f"- **Train step against timm's twin** at its faster layout, eager: {spans}. [Tables](docs/results.md#speed)"


def _first_sentence(obj: Any) -> str:
    """The first sentence of a registered part's docstring (of the class a ``partial`` wraps, with
    the options it fixes)."""
    import functools

    func = obj.func if isinstance(obj, functools.partial) else obj
    paragraph = (func.__doc__ or "").strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines())
    sentence = re.split(r"(?<=[\w)`'][.])\s+(?=[A-Z])", text, maxsplit=1)[0]
    fixed = ", ".join(f"{k}={v!r}" for k, v in getattr(obj, "keywords", {}).items())
    return sentence.replace("``", "`").replace("|", "\\|") + (f" (`{fixed}`)" if fixed else "")


def parts_table(results: Path | None = None) -> str:
    """Every registered token mixer, channel mixer (and alias) and norm, with what it is."""
    from zoo.layers.mixers import TOKEN_MIXERS
    from zoo.layers.mlp import CHANNEL_MIXER_ALIASES, CHANNEL_MIXERS
    from zoo.layers.norm import NORMS

    out = ["| kind | name | what it is |", "| --- | --- | --- |"]
    out += [f"| token mixer | `{n}` | {_first_sentence(c)} |" for n, c in TOKEN_MIXERS.items()]
    out += [f"| channel mixer | `{n}` | {_first_sentence(c)} |" for n, c in CHANNEL_MIXERS.items()]
    out += [f"| channel mixer | `{a}` | another name for `{n}` |" for a, n in CHANNEL_MIXER_ALIASES.items()]
    out += [f"| norm | `{n}` | eps `{eps:g}` |" for n, (_, eps) in NORMS.items()]
    return "\n".join(out) + "\n"


def every_table(prefix: str, command: str) -> Callable[[Path], str]:
    """A generator of every ``results/PREFIX*.md``, newest run first (the JSON's date; a run's files
    by name): the benches keep one results file per machine and setting, and the docs show them all."""

    def tables(results: Path) -> str:
        found = []
        for md in results.glob(f"{prefix}*.md"):
            meta = md.with_suffix(".json")
            date = json.loads(meta.read_text()).get("date", "") if meta.is_file() else ""
            found.append((date, md.stem, md))
        if not found:
            return f"_Not measured yet: `{command}` writes it._\n"
        found.sort(key=lambda t: t[1])
        found.sort(key=lambda t: t[0], reverse=True)
        found.sort(key=lambda t: t[0] != "")  # summaries without a JSON of their own (across machines) first
        return "\n".join(md.read_text() for _, _, md in found)

    return tables


# Generated blocks that show every results file of a bench (one a machine and setting).
TABLE_PREFIXES = {
    "speed_tables": ("speed_", "python -m zoo.bench speed"),
    "moe_tables": ("moe", "python -m zoo.bench moe"),
    "data_pipeline_tables": ("data_pipeline", "python -m zoo.bench data"),
    "optim_tables": ("optim_steps", "python -m zoo.bench optim"),
    "sparse_ffn_tables": ("sparse_ffn", "python -m zoo.bench sparse-ffn"),
}

_ROWS_CACHE: list[dict[str, Any]] = []


def _rows() -> list[dict[str, Any]]:
    if not _ROWS_CACHE:  # building every model on the meta device takes seconds: once a process
        _ROWS_CACHE.extend(model_rows())
    return _ROWS_CACHE


GENERATORS: dict[str, Callable[[Path], str]] = {
    "models": lambda results: models_table(_rows()),
    "models_full": lambda results: models_full_table(_rows()),
    "headline": headline,
    "parts": parts_table,
    **{name: every_table(prefix, command) for name, (prefix, command) in TABLE_PREFIXES.items()},
}
