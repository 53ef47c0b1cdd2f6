"""Speed against the reference: every zoo model beside its timm twin, in one run.

``python -m zoo.bench speed --models zoo_poolformer_s12,zoo_vit_tiny_patch16_224``

For each model: params, MACs, eval and train-step images/s, peak memory, and — where timm has the
same architecture — the ratio zoo / timm measured on the same input in the same process, the two
models interleaved repeat by repeat, alternating which goes first (so load on the machine and
position in the sequence hit both alike), after warm-up, median of the repeats. Beside each ratio,
the half-width of the 95 % t interval of the per-repeat ratios (zoo and timm timed back to back in
the same repeat): on a small CPU one train step varies by several percent, mostly with how many
fresh pages the allocator faults in, so a ratio is only as settled as that interval says. Before
timing, the twin's weights are loaded into the zoo model and the outputs compared, so the ratio is
between two computations of the same function.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import zoo
from zoo.bench.counts import count_macs, count_params
from zoo.bench.stats import mean_ci
from zoo.models.poolformer import TIMM_HEAD as TIMM_POOLFORMER_HEAD
from zoo.models.registry import fixed_input_size

# zoo name -> (timm name, overrides that make the zoo model compute exactly timm's function)
TWINS: dict[str, tuple[str, dict]] = {
    **{f"zoo_poolformer_{s}": (f"poolformer_{s}", TIMM_POOLFORMER_HEAD) for s in ("s12", "s24", "s36", "m36", "m48")},
    **{f"zoo_vit_{s}_patch16_224": (f"vit_{s}_patch16_224", {}) for s in ("tiny", "small", "base")},
    **{f"zoo_deit_{s}_distilled_patch16_224": (f"deit_{s}_distilled_patch16_224", {}) for s in ("tiny", "small", "base")},
    **{f"zoo_gmlp_{s}16_224": (f"gmlp_{s}16_224", {}) for s in ("ti", "s", "b")},
}
DEFAULT_MODELS = "zoo_poolformer_s12,zoo_vit_tiny_patch16_224,zoo_vit_small_patch16_224"


class PeakMemory:
    """Peak bytes of the tensors allocated during a block, above what was live when it began.

    On CUDA, the caching allocator's statistics. The CPU allocator keeps none, so there the
    profiler records every allocation and free and :func:`peak_live_bytes` sums them in time order.
    Not the process RSS: glibc keeps freed heap pages and hands mmapped ones back, so how much RSS
    grows during one step depends on what ran before it (a step can grow it by nothing when an
    earlier, bigger one left the pages behind; tests/test_bench.py checks that this peak does not).
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
        self.peak = peak_live_bytes((e.start_ns(), e.nbytes()) for e in events
                                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)


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


def _steps(model: torch.nn.Module, x: torch.Tensor, dtype: str):
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
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

    return train_step, eval_step


def twin_pair(name: str, img_size: int) -> tuple[torch.nn.Module, torch.nn.Module | None, float | None]:
    """The zoo model and its timm twin with the same weights, and their max output difference."""
    kw = {"img_size": img_size} if fixed_input_size(name) else {}
    if name not in TWINS:
        return zoo.create_model(name, **kw), None, None
    timm_name, overrides = TWINS[name]
    ref = timm.create_model(timm_name, **kw).eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "twin.pth"
        torch.save(ref.state_dict(), path)
        ours = zoo.create_model(name, pretrained=str(path), **overrides, **kw).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    return ours, ref, diff


def _prepared(name: str, *, batch: int, img_size: int, dtype: str, device: torch.device, channels_last: bool):
    """The max output difference between the zoo model and its twin, the models on ``device``, and
    each one's ``(train_step, eval_step)`` on one shared input; both dicts keyed ``zoo`` / ``timm``."""
    ours, ref, diff = twin_pair(name, img_size)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    models = {"zoo": ours} | ({"timm": ref} if ref is not None else {})
    for model in models.values():
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return diff, models, {key: _steps(model, x, dtype) for key, model in models.items()}


def peak_memory_here(name: str, batch: int, img_size: int, dtype: str, device: str, channels_last: bool,
                     threads: int) -> dict[str, int]:
    """Peak bytes of one train step (after one warm-up step) of the zoo model and of its twin."""
    torch.set_num_threads(threads)
    _, _, steps = _prepared(name, batch=batch, img_size=img_size, dtype=dtype, device=torch.device(device),
                          channels_last=channels_last)
    peaks = {}
    for key, (train_step, _) in steps.items():
        train_step()
        with PeakMemory(torch.device(device)) as mem:
            train_step()
        peaks[key] = mem.peak
    return peaks


def _peak_memory_in_child(name: str, **settings) -> dict[str, int]:
    """:func:`peak_memory_here` in a fresh Python process. Not in this one: a profiled step leaves
    the heap in another state, which slowed timm's PoolFormer-S12 steps after it from ~17 to ~13
    img/s on this project's 2-core CPU (zoo's kept their speed), so it would skew later ratios."""
    code = ("import json, sys; from zoo.bench.speed import peak_memory_here; "
            "print(json.dumps(peak_memory_here(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps({"name": name, **settings})],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"peak memory of {name} in a child process failed: {why}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(models: list[str], *, batch: int, img_size: int, repeats: int, warmup: int, dtype: str,
            device: torch.device, channels_last: bool) -> list[dict]:
    rows = []
    for name in models:
        diff, models, steps = _prepared(name, batch=batch, img_size=img_size, dtype=dtype, device=device,
                                        channels_last=channels_last)
        times = {key: {"train": [], "eval": []} for key in models}
        for train_step, eval_step in steps.values():
            for _ in range(warmup):
                train_step()
                eval_step()
        order = list(steps.items())
        for r in range(repeats):  # interleaved, and alternating who goes first: zoo, timm, timm, zoo, ...
            for key, (train_step, eval_step) in (order if r % 2 == 0 else order[::-1]):
                times[key]["train"].append(_timed(train_step, device))
                times[key]["eval"].append(_timed(eval_step, device))
        memory = _peak_memory_in_child(name, batch=batch, img_size=img_size, dtype=dtype, device=str(device),
                                       channels_last=channels_last, threads=torch.get_num_threads())
        ips = {key: {k: batch / statistics.median(v) for k, v in t.items()} for key, t in times.items()}
        has_twin = "timm" in models
        row = {"model": name, "params_m": count_params(models["zoo"]) / 1e6,
               "gmacs": count_macs(models["zoo"].cpu(), img_size) / 1e9,
               "eval_ips": ips["zoo"]["eval"], "train_ips": ips["zoo"]["train"], "peak_mem_mb": memory["zoo"] / 2**20,
               "twin": TWINS[name][0] if has_twin else "", "max_diff": diff}
        if has_twin:
            row.update(twin_eval_ips=ips["timm"]["eval"], twin_train_ips=ips["timm"]["train"],
                       twin_peak_mem_mb=memory["timm"] / 2**20,
                       eval_ratio=ips["zoo"]["eval"] / ips["timm"]["eval"],
                       train_ratio=ips["zoo"]["train"] / ips["timm"]["train"])
            for k in ("train", "eval"):  # per repeat: timm's time / zoo's time, measured back to back
                paired = [t / z for z, t in zip(times["zoo"][k], times["timm"][k], strict=True)]
                row[f"{k}_ratio_ci"] = mean_ci(paired)[1]
        rows.append(row)
        for model in models.values():
            model.cpu()
        print(format_row(row), flush=True)
    return rows


HEADER = ("| model | params (M) | GMACs | eval img/s | train img/s | peak mem (MB) | timm twin | "
          "twin train img/s | twin peak mem (MB) | train ratio | eval ratio | max \\|diff\\| |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")


def _ratio(ratio: float, half: float) -> str:
    return f"{ratio:.2f}x" if math.isnan(half) else f"{ratio:.2f}x ± {half:.2f}"


def format_row(r: dict) -> str:
    twin = (f"{r['twin']} | {r['twin_train_ips']:.3g} | {r['twin_peak_mem_mb']:.0f} | **{_ratio(r['train_ratio'], r['train_ratio_ci'])}** | "
            f"{_ratio(r['eval_ratio'], r['eval_ratio_ci'])} | {r['max_diff']:.1e}") if r.get("twin") else "- | - | - | - | - | -"
    return (f"| {r['model']} | {r['params_m']:.1f} | {r['gmacs']:.2f} | {r['eval_ips']:.3g} | {r['train_ips']:.3g} | "
            f"{r['peak_mem_mb']:.0f} | {twin} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated zoo model names")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true", help="feed channels_last inputs to both models")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = set(zoo.list_models())
    for m in models:
        if m not in known:
            print(f"zoo.bench speed: {zoo.models.registry.unknown_model(m)}", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"speed: batch {args.batch}, {args.img_size}x{args.img_size}, {args.dtype}, {where}; "
          f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up; torch {torch.__version__}, "
          f"timm {timm.__version__}")
    print(HEADER)
    measure(models, batch=args.batch, img_size=args.img_size, repeats=args.repeats, warmup=args.warmup,
            dtype=args.dtype, device=device, channels_last=args.channels_last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
