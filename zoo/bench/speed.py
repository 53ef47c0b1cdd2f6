"""Speed against the reference: every zoo model beside its twin at its best, in one run.

``python -m zoo.bench speed --models zoo_poolformer_s12,zoo_vit_tiny_patch16_224 [--compile]``

For each model: params, MACs, eval and train-step images/s, peak memory, and -- where a public
library has the same architecture (timm; transformers for CvT: ``zoo/bench/twins.py``) -- the
ratio zoo / twin measured on the same input in the same process. The twin is timed in NCHW and in
channels_last (a timm user gets channels_last with one flag) and the ratio is against the *faster*
of the two, chosen per row and per step (train, eval) and recorded; the ratios against each twin
layout are printed beside it. Ours is timed in the same layouts and enters at its faster one. A
layout a model cannot run (its first forward raises) is left out and named under the table.

Every model and layout is interleaved repeat by repeat, alternating which goes first (so load on
the machine and position in the sequence hit all alike), after warm-up, median of the repeats.
Beside each ratio, the half-width of the 95 % t interval of the per-repeat ratios (the two chosen
layouts timed in the same repeat): on a small CPU one train step varies by several percent, mostly
with how many fresh pages the allocator faults in, so a ratio is only as settled as that interval
says. Before timing, the twin and the zoo model are given the same weights and their outputs
compared, so the ratio is between two computations of the same function.

``--compile`` adds a second table: both sides wrapped in ``torch.compile`` with the same mode, the
first call of each (the compilation) in the warm-up, peak memory not measured.

The train step ends with an optimizer step: ``--optim sgd`` (the default) is torch's plain SGD, the
cheapest update, so the ratio is mostly the models'; ``--optim adamw`` is the optimizer the zoo
trains with (``zoo.train.optim.create_optimizer``: timm's AdamW with DeiT's weight-decay groups),
on both sides, so the ratio is the one a user training both models sees.

The machine is printed first; each table is written to ``--out`` (default ``zoo/bench/results``)
as ``NAME_<machine>.md`` (the table with its caption), ``.csv`` and ``.json`` (rows, command,
commit, CPU, threads, versions), where ``<machine>`` names the machine kind
(``zoo.bench.machines.machine_slug``: ``amd-epyc-avx512-bf16``, ``intel-xeon-avx512-amx``, a GPU's
name), and then ``NAME_machines.md``: the train-step ratio of every model on every machine kind met
(one row each, newest first), which the README shows (``python -m zoo.bench readme`` copies
``NAME.md`` files between ``<!-- results:NAME -->`` markers). NAME is ``--name`` (default
``speed_<device>_<dtype>``, then ``_<optim>`` unless SGD), ``_compiled`` added for the compiled
table. ``--spread-only`` rewrites ``NAME_machines.md`` from the files already there and measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import zoo
from zoo.bench import twins
from zoo.bench.counts import count_macs, count_params
from zoo.bench.machines import add_spread_only, rewrite_spreads, write_machine_results
from zoo.bench.report import RESULTS, command_line, environment
from zoo.bench.twins import TWINS, twin_pair  # noqa: F401 - the twins' catalogue, importable from here as before
from zoo.machine import describe
from zoo.study.statistics import mean_ci

PROG = "python -m zoo.bench speed"
DEFAULT_MODELS = "zoo_poolformer_s12,zoo_vit_tiny_patch16_224,zoo_vit_small_patch16_224"
LAYOUTS = ("nchw", "channels_last")
SHORT = {"nchw": "NCHW", "channels_last": "CL"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIMS = ("sgd", "adamw")  # the train step's update (module docstring)


def _optimizer(model: torch.nn.Module, optim: str) -> torch.optim.Optimizer:
    """``sgd``: torch's plain SGD; ``adamw``: the zoo's training AdamW (its factory, DeiT's groups).
    A tiny learning rate either way: the weights barely move while they are timed."""
    if optim == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-6)
    from zoo.train.config import OptimConfig, TrainConfig
    from zoo.train.optim import create_optimizer

    return create_optimizer(model, TrainConfig(optim=OptimConfig(name=optim, lr=1e-6)))


class PeakMemory:
    """Peak bytes of the tensors allocated during a block, above what was live when it began.

    On CUDA, the caching allocator's statistics. The CPU allocator keeps none, so there the
    profiler records every allocation and free and :func:`peak_live_bytes` sums them in time order.
    Not the process RSS: glibc keeps freed heap pages and hands mmapped ones back, so how much RSS
    grows during one step depends on what ran before it (a step can grow it by nothing when an
    earlier, bigger one left the pages behind; tests/test_bench_speed.py checks that this peak does not).
    """

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        # Kineto otherwise writes its start/stop lines and a failed GPU probe to stderr.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self._profiler.__exit__(*exc)
        events = self._profiler.profiler.kineto_results.events()
        self.peak = peak_live_bytes(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )


def peak_live_bytes(allocations) -> int:
    """Highest running total of ``(time, bytes)`` records (a free is negative bytes), from 0."""
    live = peak = 0
    for _, nbytes in sorted(allocations, key=lambda record: record[0]):  # stable: ties keep record order
        live += nbytes
        peak = max(peak, live)
    return peak


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _steps(
    model: torch.nn.Module, x: torch.Tensor, dtype: str, key: tuple[str, str] = ("zoo", "nchw"), optim: str = "sgd"
):
    """``(train_step, eval_step)`` of ``model`` on ``x``; each carries ``.key`` = (side, layout, step)."""
    opt = _optimizer(model, optim)
    device = x.device

    def train_step():
        model.train()
        with _autocast(device, dtype):
            out = model(x)
        out.float().logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_step():
        model.eval()
        with torch.no_grad(), _autocast(device, dtype):
            model(x)

    train_step.key, eval_step.key = (*key, "train"), (*key, "eval")
    return train_step, eval_step


def _in_layout(
    model: torch.nn.Module, x: torch.Tensor, layout: str, device: torch.device, compile_mode: str | None
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A copy of ``model`` on ``device`` and the input, both in ``layout``; compiled if asked."""
    model = copy.deepcopy(model).to(device)
    if layout == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if compile_mode is not None:
        model = torch.compile(model, mode=compile_mode)
    return model, x


def _prepared(
    bases: dict[str, torch.nn.Module],
    x: torch.Tensor,
    layouts,
    *,
    dtype: str,
    device: torch.device,
    compile_mode: str | None = None,
    optim: str = "sgd",
):
    """Each side in each layout it runs: ``{(side, layout): (train_step, eval_step)}``, and
    ``{(side, layout): why}`` for the channels_last layouts whose first forward raised (an NCHW
    failure is raised: every model must run its native layout)."""
    steps, unsupported = {}, {}
    for layout in layouts:
        for side, base in bases.items():
            model, x_in = _in_layout(base, x, layout, device, compile_mode)
            train_step, eval_step = _steps(model, x_in, dtype, (side, layout), optim)
            try:
                eval_step()  # the probe; under torch.compile, the eval graph's compilation
            except Exception as e:
                if layout == "nchw":
                    raise
                unsupported[(side, layout)] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
                continue
            steps[(side, layout)] = (train_step, eval_step)
    return steps, unsupported


def peak_memory_here(
    name: str,
    batch: int,
    img_size: int,
    dtype: str,
    device: str,
    layouts: dict[str, str],
    threads: int,
    optim: str = "sgd",
) -> dict[str, int]:
    """Peak bytes of one train step (after one warm-up step) of the zoo model and of its twin, each
    in its layout of ``layouts`` (``{"zoo": "channels_last", "twin": "nchw"}``)."""
    torch.set_num_threads(threads)
    ours, ref, _ = twin_pair(name, img_size)
    bases = {"zoo": ours} | ({"twin": ref} if ref is not None else {})
    dev = torch.device(device)
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    peaks = {}
    for side, base in bases.items():
        model, x_in = _in_layout(base, x, layouts[side], dev, None)
        train_step, _ = _steps(model, x_in, dtype, optim=optim)
        train_step()
        with PeakMemory(dev) as mem:
            train_step()
        peaks[side] = mem.peak
        del model, train_step
    return peaks


def _peak_memory_in_child(name: str, **settings) -> dict[str, int]:
    """:func:`peak_memory_here` in a fresh Python process. Not in this one: a profiled step leaves
    the heap in another state, which slowed the timm PoolFormer-S12 steps timed after it (zoo's kept
    their speed), so it would skew later ratios."""
    code = (
        "import json, sys; from zoo.bench.speed import peak_memory_here; "
        "print(json.dumps(peak_memory_here(**json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps({"name": name, **settings})],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"peak memory of {name} in a child process failed: {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fastest(medians: dict[tuple[str, str], dict[str, float]], side: str, step: str) -> str:
    """The layout in which ``side`` ran ``step`` in the least median time (ties: the first layout)."""
    return min((key for key in medians if key[0] == side), key=lambda key: medians[key][step])[1]


def measure(
    models: list[str],
    *,
    batch: int,
    img_size: int,
    repeats: int,
    warmup: int,
    dtype: str,
    device: torch.device,
    layouts=LAYOUTS,
    compile_mode: str | None = None,
    optim: str = "sgd",
) -> list[dict]:
    """One row per model (printed as it is measured): ours and the twin, each in every layout of
    ``layouts`` it runs, interleaved; ratios against the twin's faster layout. With
    ``compile_mode``, both sides are ``torch.compile``-d in that mode (and peak memory is not measured)."""
    rows = []
    for name in models:
        ours, ref, diff = twin_pair(name, img_size)
        bases = {"zoo": ours} | ({"twin": ref} if ref is not None else {})
        x = torch.randn(batch, 3, img_size, img_size, device=device)
        steps, unsupported = _prepared(
            bases, x, layouts, dtype=dtype, device=device, compile_mode=compile_mode, optim=optim
        )
        times = {key: {"train": [], "eval": []} for key in steps}
        # Under torch.compile the first train call compiles the training graph: never timed.
        for train_step, eval_step in steps.values():
            for _ in range(max(warmup, 1) if compile_mode else warmup):
                train_step()
                eval_step()
        order = list(steps.items())  # zoo nchw, twin nchw, zoo channels_last, twin channels_last
        for r in range(repeats):  # interleaved, and alternating who goes first
            for key, (train_step, eval_step) in order if r % 2 == 0 else order[::-1]:
                times[key]["train"].append(_timed(train_step, device))
                times[key]["eval"].append(_timed(eval_step, device))
        del steps, order
        medians = {key: {k: statistics.median(v) for k, v in t.items()} for key, t in times.items()}
        best = {(side, k): _fastest(medians, side, k) for side in bases for k in ("train", "eval")}
        ips = {key: {k: batch / m for k, m in t.items()} for key, t in medians.items()}
        has_twin = "twin" in bases
        memory = {}
        if compile_mode is None:
            memory = _peak_memory_in_child(
                name,
                batch=batch,
                img_size=img_size,
                dtype=dtype,
                device=str(device),
                layouts={side: best[(side, "train")] for side in bases},
                threads=torch.get_num_threads(),
                optim=optim,
            )
        row = {
            "model": name,
            "compiled": compile_mode or "",
            "params_m": count_params(ours) / 1e6,
            "gmacs": count_macs(ours, img_size) / 1e9,
            "layout": best[("zoo", "train")],
            "eval_layout": best[("zoo", "eval")],
            "train_ips": ips[("zoo", best[("zoo", "train")])]["train"],
            "eval_ips": ips[("zoo", best[("zoo", "eval")])]["eval"],
            "peak_mem_mb": memory["zoo"] / 2**20 if memory else None,
            "twin": twins.twin_label(name),
            "max_diff": diff,
        }
        for layout in layouts:
            for k in ("train", "eval"):
                row[f"{k}_ips_{layout}"] = ips[("zoo", layout)][k] if ("zoo", layout) in ips else None
        if has_twin:
            row.update(
                twin_layout=best[("twin", "train")],
                twin_eval_layout=best[("twin", "eval")],
                twin_train_ips=ips[("twin", best[("twin", "train")])]["train"],
                twin_eval_ips=ips[("twin", best[("twin", "eval")])]["eval"],
                twin_peak_mem_mb=memory["twin"] / 2**20 if memory else None,
            )
            for k in ("train", "eval"):
                ours_key, twin_key = ("zoo", best[("zoo", k)]), ("twin", best[("twin", k)])
                row[f"{k}_ratio"] = ips[ours_key][k] / ips[twin_key][k]
                # per repeat: the twin's time / ours, both at their faster layout, in the same repeat
                paired = [t / z for z, t in zip(times[ours_key][k], times[twin_key][k], strict=True)]
                row[f"{k}_ratio_ci"] = mean_ci(paired)[1]
                for layout in layouts:
                    row[f"twin_{k}_ips_{layout}"] = ips[("twin", layout)][k] if ("twin", layout) in ips else None
                    row[f"{k}_ratio_{layout}"] = (
                        ips[ours_key][k] / ips[("twin", layout)][k] if ("twin", layout) in ips else None
                    )
        row["unsupported"] = "; ".join(
            f"{'ours' if side == 'zoo' else 'twin'} {layout}: {why}" for (side, layout), why in unsupported.items()
        )
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (
    "| model | params (M) | GMACs | train img/s | eval img/s | peak mem (MB) | twin "
    "| faster layout (ours / twin) | twin train img/s | twin peak mem (MB) | train ratio "
    "| vs twin NCHW | vs twin CL | eval ratio | max \\|diff\\| |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)
COLUMNS = [
    "model",
    "compiled",
    "params_m",
    "gmacs",
    "layout",
    "eval_layout",
    "train_ips",
    "eval_ips",
    "peak_mem_mb",
    *(f"{k}_ips_{layout}" for layout in LAYOUTS for k in ("train", "eval")),
    "twin",
    "twin_layout",
    "twin_eval_layout",
    "twin_train_ips",
    "twin_eval_ips",
    "twin_peak_mem_mb",
    *(f"twin_{k}_ips_{layout}" for layout in LAYOUTS for k in ("train", "eval")),
    "train_ratio",
    "train_ratio_ci",
    "eval_ratio",
    "eval_ratio_ci",
    *(f"{k}_ratio_{layout}" for layout in LAYOUTS for k in ("train", "eval")),
    "max_diff",
    "unsupported",
]


def _ratio(ratio: float, half: float) -> str:
    return f"{ratio:.2f}x" if math.isnan(half) else f"{ratio:.2f}x ± {half:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _vs(r: dict, layout: str) -> str:
    if r.get(f"train_ratio_{layout}") is None:
        return "n/a" if layout in r.get("unsupported", "") else "-"
    return f"{r[f'train_ratio_{layout}']:.2f}x"


def format_row(r: dict) -> str:
    layouts = f"{SHORT[r['layout']]} / {SHORT[r['twin_layout']]}" if r.get("twin") else SHORT[r["layout"]]
    twin = (
        (
            f"{r['twin']} | {layouts} | {r['twin_train_ips']:.3g} | {_num(r['twin_peak_mem_mb'], '.0f')} | "
            f"**{_ratio(r['train_ratio'], r['train_ratio_ci'])}** | {_vs(r, 'nchw')} | {_vs(r, 'channels_last')} | "
            f"{_ratio(r['eval_ratio'], r['eval_ratio_ci'])} | {r['max_diff']:.1e}"
        )
        if r.get("twin")
        else f"- | {layouts} | - | - | - | - | - | - | -"
    )
    return (
        f"| {r['model']} | {r['params_m']:.1f} | {r['gmacs']:.2f} | {r['train_ips']:.3g} | {r['eval_ips']:.3g} | "
        f"{_num(r['peak_mem_mb'], '.0f')} | {twin} |"
    )


def _versions(models: list[str]) -> dict[str, str]:
    versions = {"torch": torch.__version__, "timm": timm.__version__}
    if any(m in twins.CVT_TWINS for m in models):
        versions["transformers"] = importlib.metadata.version("transformers")
    return versions


def caption(args: argparse.Namespace, command: str, env: dict, versions: dict[str, str], compiled: bool) -> str:
    """The paragraph above a table: what was measured, how, and on what (README text)."""
    where = (
        f"GPU {torch.cuda.get_device_name(torch.device(args.device))}, CPU "
        if args.device.startswith("cuda")
        else "CPU "
    ) + f"{env['cpu_model']} ({env['cpu_capability']}), {env['threads']} threads"
    what = f"both sides `torch.compile(mode={args.compile_mode!r})`" if compiled else "eager"
    step = {"sgd": "SGD", "adamw": "the zoo's AdamW"}[args.optim]
    return (
        f"{where}; {', '.join(f'{k} {v}' for k, v in versions.items())}; {args.dtype}, batch {args.batch} at "
        f"{args.img_size}, {what}, train step with {step}; median of {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up; "
        f"commit {env['commit']}, {env['date'][:10]}. Ratio = ours / twin at the twin's faster layout (NCHW or "
        f"channels_last, named per row), ± the half-width of the 95 % t interval of the per-repeat ratios; "
        f"ours at its faster layout too. `{command}`"
    )


def markdown(rows: list[dict], head: str) -> str:
    notes = [f"- {r['model']}: {r['unsupported']}" for r in rows if r["unsupported"]]
    return "\n".join([head, "", HEADER, *map(format_row, rows)] + (["", "Layouts left out:", *notes] if notes else []))


def spread_title(name: str) -> str:
    compiled = "both sides torch.compile-d" if name.endswith("_compiled") else "eager"
    return (
        f"Train-step speed, ours / the timm twin at its faster layout ({compiled}; ± the 95 % interval of the "
        f"per-repeat ratios), on every machine kind met (`{name}`):"
    )


def spread_cells(result: dict) -> dict[str, str]:
    """A results file's row of the spread across machines: its setting, then each model's ratio."""
    settings = result.get("settings", {})
    optim = settings.get("optim", "sgd")  # files written before --optim timed SGD
    cells = {"setting": f"{settings.get('dtype', '?')}, batch {settings.get('batch', '?')}, {optim}"}
    for r in result["rows"]:
        if r.get("twin"):
            cells[r["model"]] = _ratio(r["train_ratio"], r["train_ratio_ci"])
    return cells


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated zoo model names")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help="comma-separated memory layouts both sides are timed in (default: %(default)s)",
    )
    p.add_argument("--channels-last", action="store_true", help="time channels_last only (= --layouts channels_last)")
    p.add_argument("--compile", action="store_true", help="a second table with both sides torch.compile-d")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode of both sides")
    p.add_argument("--optim", choices=OPTIMS, default="sgd", help="the train step's update (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    p.add_argument(
        "--name", default=None, help="results name (default: speed_<device>_<dtype>[_<optim>]; files NAME_<machine>)"
    )
    add_spread_only(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = args.name or f"speed_{device.type}_{args.dtype}" + ("" if args.optim == "sgd" else f"_{args.optim}")
    if args.spread_only:
        return rewrite_spreads(args.out, {n: spread_title(n) for n in (name, f"{name}_compiled")}, spread_cells)
    layouts = (
        ("channels_last",) if args.channels_last else tuple(s.strip() for s in args.layouts.split(",") if s.strip())
    )
    bad = [s for s in layouts if s not in LAYOUTS]
    if bad or not layouts:
        print(f"zoo.bench speed: --layouts {args.layouts!r}: expected some of {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = set(zoo.list_models())
    for m in models:
        if m not in known:
            print(f"zoo.bench speed: {zoo.models.registry.unknown_model(m)}", file=sys.stderr)
            return 2
        if why := twins.missing(m):
            print(f"zoo.bench speed: {why}", file=sys.stderr)
            return 2
    machine, versions = describe(), _versions(models)
    print(f"machine: {machine.summary()}; {', '.join(f'{k} {v}' for k, v in versions.items())}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"speed: batch {args.batch}, {args.img_size}x{args.img_size}, {args.dtype}, {where}, train step with "
        f"{args.optim}; layouts {', '.join(layouts)}; median of {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up"
    )
    command, env = command_line(PROG, argv), environment(torch.get_num_threads())
    env["versions"].update(versions)
    settings = {k: getattr(args, k) for k in ("batch", "img_size", "repeats", "warmup", "dtype", "device", "optim")}
    for compile_mode in [None] + ([args.compile_mode] if args.compile else []):
        if compile_mode:
            print(f"\ncompiled: both sides torch.compile(mode={compile_mode!r})")
        print(HEADER, flush=True)
        rows = measure(
            models,
            batch=args.batch,
            img_size=args.img_size,
            repeats=args.repeats,
            warmup=args.warmup,
            dtype=args.dtype,
            device=device,
            layouts=layouts,
            compile_mode=compile_mode,
            optim=args.optim,
        )
        text = markdown(rows, caption(args, command, env, versions, compile_mode is not None))
        table = name + ("_compiled" if compile_mode else "")
        meta = {
            "command": command,
            **env,
            "machine": machine.record(),
            "machine_summary": machine.summary(),
            "settings": {**settings, "layouts": list(layouts), "compile_mode": compile_mode},
        }
        spread = (spread_title(table), spread_cells)
        paths = write_machine_results(args.out, table, meta["machine"], text, rows, COLUMNS, meta, spread, str(device))
        for r in rows:
            if r["unsupported"]:
                print(f"  layouts left out, {r['model']}: {r['unsupported']}")
        print(f"results: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
