"""The speed bench (zoo/bench/speed.py) and its twins (zoo/bench/twins.py), at toy size.

Which layout is the reference, how the interval is computed and what the results files hold are
checked with injected step times (every step the bench times carries ``.key = (side, layout,
step)``), on two small stand-in models; one test runs the real twins end to end.
"""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import torch
from scipy import stats
from torch import nn

import zoo
from zoo.bench import speed, twins
from zoo.bench.machines import machine_slug

CPU = torch.device("cpu")


class Net(nn.Module):
    """A stand-in model: 3x3 convolution, pooling, linear head. With ``nchw_only``, a forward on a
    channels_last input raises, as a model whose reshapes assume NCHW strides would."""

    forwards = 0

    def __init__(self, nchw_only: bool = False):
        super().__init__()
        self.conv, self.head, self.nchw_only = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10), nchw_only

    def forward(self, x):
        Net.forwards += 1
        y = self.conv(x)
        if self.nchw_only and not y.is_contiguous():
            raise RuntimeError("view size is not compatible with input tensor's size and stride")
        return self.head(y.mean((2, 3)))


def _stand_ins(monkeypatch, *, twin_nchw_only: bool = False, memory: bool = True):
    """Every model's pair becomes two small Nets with the same weights; peak memory a fixed 1 / 2 MiB."""

    def pair(name, img_size):
        ours = Net()
        ref = Net(nchw_only=twin_nchw_only)
        ref.load_state_dict(ours.state_dict())
        return ours, ref, 0.0

    monkeypatch.setattr(speed, "twin_pair", pair)
    if memory:
        monkeypatch.setattr(speed, "_peak_memory_in_child", lambda name, **kw: {"zoo": 2**20, "twin": 2**21})


def _fake_clock(monkeypatch, seconds: dict[tuple[str, str, str], float]):
    """Every timed step takes ``seconds[(side, layout, step)]``; returns the keys in timing order."""
    calls = []

    def timed(fn, device):
        calls.append(fn.key)
        return seconds[fn.key]

    monkeypatch.setattr(speed, "_timed", timed)
    return calls


# Twin: channels_last is faster in train (1.0 s against 2.0 s), NCHW in eval (0.1 against 0.2).
# Ours: channels_last is faster in train (0.8 s), NCHW in eval (0.08 s).
SECONDS = {
    ("twin", "nchw", "train"): 2.0,
    ("twin", "channels_last", "train"): 1.0,
    ("twin", "nchw", "eval"): 0.1,
    ("twin", "channels_last", "eval"): 0.2,
    ("zoo", "nchw", "train"): 1.5,
    ("zoo", "channels_last", "train"): 0.8,
    ("zoo", "nchw", "eval"): 0.08,
    ("zoo", "channels_last", "eval"): 0.5,
}


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells, stripped of their padding."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _measure(**kw):
    settings = {"batch": 2, "img_size": 8, "repeats": 3, "warmup": 0, "dtype": "fp32", "device": CPU} | kw
    return speed.measure(["zoo_poolformer_s12"], **settings)[0]


def test_headline_ratio_is_against_the_faster_twin_layout(monkeypatch):
    _stand_ins(monkeypatch)
    calls = _fake_clock(monkeypatch, SECONDS)
    r = _measure()
    assert (r["twin_layout"], r["twin_eval_layout"]) == ("channels_last", "nchw")  # each row says which was faster
    assert (r["layout"], r["eval_layout"]) == ("channels_last", "nchw")  # ours enters at its faster layout too
    assert r["train_ratio"] == pytest.approx(1.0 / 0.8)  # the faster twin (CL, 1.0 s), not its NCHW (2.0 s)
    assert r["train_ratio_nchw"] == pytest.approx(2.0 / 0.8) and r["train_ratio_channels_last"] == pytest.approx(1.25)
    assert r["eval_ratio"] == pytest.approx(0.1 / 0.08) and r["eval_ratio_channels_last"] == pytest.approx(0.2 / 0.08)
    assert r["twin_train_ips"] == pytest.approx(2 / 1.0) and r["twin_train_ips_nchw"] == pytest.approx(2 / 2.0)
    assert r["train_ips"] == pytest.approx(2 / 0.8) and r["train_ips_nchw"] == pytest.approx(2 / 1.5)
    assert r["train_ratio_ci"] == 0.0  # equal per-repeat ratios
    # both layouts of both sides, interleaved, the order reversed every other repeat
    first = [("zoo", "nchw"), ("twin", "nchw"), ("zoo", "channels_last"), ("twin", "channels_last")]
    order = [k[:2] for k in calls[::2]]
    assert order == first + first[::-1] + first
    row = speed.format_row(r)
    assert "| CL / CL |" in row and "**1.25x ± 0.00**" in row and "| 2.50x | 1.25x |" in row  # headline, vs NCHW, vs CL
    assert r["peak_mem_mb"] == 1.0 and r["twin_peak_mem_mb"] == 2.0


def test_headline_follows_the_twin_when_nchw_is_its_faster_layout(monkeypatch):
    _stand_ins(monkeypatch)
    seconds = SECONDS | {("twin", "nchw", "train"): 0.5}
    _fake_clock(monkeypatch, seconds)
    r = _measure()
    assert r["twin_layout"] == "nchw"
    assert r["train_ratio"] == pytest.approx(0.5 / 0.8) == pytest.approx(r["train_ratio_nchw"])
    assert r["train_ratio_channels_last"] == pytest.approx(1.0 / 0.8)
    assert "| CL / NCHW |" in speed.format_row(r)


def test_peak_memory_is_measured_in_the_faster_layouts(monkeypatch):
    _stand_ins(monkeypatch, memory=False)
    _fake_clock(monkeypatch, SECONDS | {("twin", "nchw", "train"): 0.5})
    seen = {}

    def child(name, **kw):
        seen.update(kw)
        return {"zoo": 0, "twin": 0}

    monkeypatch.setattr(speed, "_peak_memory_in_child", child)
    _measure()
    assert seen["layouts"] == {"zoo": "channels_last", "twin": "nchw"}


def test_a_layout_a_model_cannot_run_is_left_out_and_named(monkeypatch):
    _stand_ins(monkeypatch, twin_nchw_only=True)
    calls = _fake_clock(monkeypatch, SECONDS)
    r = _measure()
    assert ("twin", "channels_last", "train") not in calls
    assert r["twin_layout"] == "nchw" and r["train_ratio"] == pytest.approx(2.0 / 0.8)
    assert r["train_ratio_channels_last"] is None and r["twin_train_ips_channels_last"] is None
    assert r["unsupported"].startswith("twin channels_last: RuntimeError: view size is not compatible")
    assert "| 2.50x | n/a |" in speed.format_row(r)
    assert "Layouts left out:" in speed.markdown([r], "caption")


def test_ratio_interval_comes_from_the_paired_repeats(monkeypatch):
    # Fake clocks: our train steps take 1, 2, 3 s and the twin's 2 s each, so the per-repeat ratios
    # are 2, 1, 2/3: their mean's 95 % t interval is what the row must carry.
    _stand_ins(monkeypatch)
    durations = iter([1.0, 0.1, 2.0, 0.1, 2.0, 0.1, 2.0, 0.1, 3.0, 0.1, 2.0, 0.1])  # train, eval per call
    monkeypatch.setattr(speed, "_timed", lambda fn, device: next(durations))
    r = _measure(layouts=("nchw",))
    # repeat 0: zoo then twin; repeat 1: twin then zoo; repeat 2: zoo then twin
    zoo_train, twin_train = [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]
    paired = [t / z for z, t in zip(zoo_train, twin_train, strict=True)]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(paired) / math.sqrt(3)
    assert r["train_ratio"] == pytest.approx(1.0)  # medians: 2 s against 2 s
    assert r["train_ratio_ci"] == pytest.approx(half)
    assert r["eval_ratio_ci"] == 0.0
    row = speed.format_row(r)
    assert f"**1.00x ± {half:.2f}**" in row and "| 1.00x | - |" in row  # CL not measured: no ratio against it


def test_compile_wraps_both_sides_in_every_layout_with_one_mode(monkeypatch):
    _stand_ins(monkeypatch)
    calls = _fake_clock(monkeypatch, SECONDS)
    compiled = []

    def fake_compile(model, mode=None):
        compiled.append((type(model).__name__, mode))
        return model

    monkeypatch.setattr(speed.torch, "compile", fake_compile)
    monkeypatch.setattr(Net, "forwards", 0)
    r = _measure(compile_mode="max-autotune", repeats=1, warmup=0)
    assert compiled == [("Net", "max-autotune")] * 4  # ours and the twin, NCHW and channels_last
    assert r["compiled"] == "max-autotune" and r["peak_mem_mb"] is None and r["twin_peak_mem_mb"] is None
    assert len(calls) == 8
    # untimed, per side and layout: the probe's eval forward, then (the fake clock runs nothing) one
    # warm-up train and eval step although warmup=0: the compilations are never timed
    assert Net.forwards == 4 * 3 + 1  # and one more: count_macs's


def test_compile_for_real(monkeypatch):
    # torch.compile with inductor on both sides, NCHW only (~10 s on 2 busy cores, cold cache).
    _stand_ins(monkeypatch)
    built = []
    real = speed._in_layout

    def record(*args):
        model, x = real(*args)
        built.append(model)
        return model, x

    monkeypatch.setattr(speed, "_in_layout", record)
    r = _measure(compile_mode="default", repeats=1, layouts=("nchw",))
    assert [type(m).__name__ for m in built] == ["OptimizedModule"] * 2
    assert r["train_ratio"] > 0 and r["compiled"] == "default"


def test_main_prints_the_machine_and_writes_the_results_files(monkeypatch, tmp_path, capsys):
    _stand_ins(monkeypatch)
    _fake_clock(monkeypatch, SECONDS)
    monkeypatch.setattr(speed.torch, "compile", lambda model, mode=None: model)
    argv = [
        "--models",
        "zoo_poolformer_s12",
        "--batch",
        "2",
        "--img-size",
        "8",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--compile",
        "--out",
        str(tmp_path),
        "--name",
        "toy",
    ]
    assert speed.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"machine: {speed.describe().summary()}; torch {torch.__version__}, timm ")
    assert sum("| vs twin NCHW | vs twin CL |" in line for line in out) == 2  # both tables print both ratios
    assert any(line.startswith("compiled: both sides torch.compile(mode='default')") for line in out)
    kind = machine_slug(speed.describe().record())  # the files name the machine kind that measured them
    for name, compiled in (("toy", ""), ("toy_compiled", "default")):
        stem = f"{name}_{kind}"
        md = (tmp_path / f"{stem}.md").read_text()
        assert md.startswith("CPU ") and "| zoo_poolformer_s12 |" in md and "**1.25x ± 0.00**" in md
        assert f"`python -m zoo.bench speed {' '.join(argv)}`" in md
        with open(tmp_path / f"{stem}.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == speed.COLUMNS and rows[0]["twin_layout"] == "channels_last"
        assert rows[0]["compiled"] == compiled
        meta = json.loads((tmp_path / f"{stem}.json").read_text())
        assert meta["command"] == f"python -m zoo.bench speed {' '.join(argv)}"
        for field in ("commit", "date", "cpu_model", "cpu_capability", "cores"):
            assert meta[field] is not None, field
        assert meta["threads"] == 1 and meta["versions"]["torch"] == torch.__version__ and "timm" in meta["versions"]
        assert meta["machine"]["cpu_flags"] is not None and meta["machine_summary"] == speed.describe().summary()
        assert meta["settings"]["layouts"] == ["nchw", "channels_last"] and meta["settings"]["optim"] == "sgd"
        assert meta["rows"][0]["train_ratio"] == pytest.approx(1.25)
        spread = (tmp_path / f"{name}_machines.md").read_text().splitlines()
        header, row = _cells(spread[2]), _cells(spread[4])
        assert header == ["machine", "date", "threads", "setting", "zoo_poolformer_s12"]
        assert row[0].startswith(speed.describe().cpu_model) and row[1] == meta["date"][:10] and row[2] == "1"
        assert row[3:] == ["fp32, batch 2, sgd", "1.25x ± 0.00"] and len(spread) == 7  # this machine's row only
    assert "SGD" in md


def test_the_train_step_updates_with_the_optimizer_asked(monkeypatch):
    """--optim adamw: the zoo's training AdamW (its factory: DeiT's decay / no-decay groups), on both sides."""
    built = []
    real = speed._optimizer
    monkeypatch.setattr(speed, "_optimizer", lambda model, optim: built.append(real(model, optim)) or built[-1])
    for optim in ("sgd", "adamw"):
        model = Net()
        train_step, _ = speed._steps(model, torch.randn(2, 3, 8, 8), "fp32", optim=optim)
        before = [p.detach().clone() for p in model.parameters()]
        train_step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), optim  # a step was taken
    sgd, adamw = built
    assert type(sgd) is torch.optim.SGD and len(sgd.param_groups) == 1
    assert type(adamw) is torch.optim.AdamW and adamw.state  # stepped: its moments exist
    decay = sorted(g["weight_decay"] for g in adamw.param_groups)
    assert decay == [0.0, 0.05]  # biases without decay, weights with DeiT's 0.05
    no_decay = next(g for g in adamw.param_groups if g["weight_decay"] == 0.0)
    assert all(p.ndim == 1 for p in no_decay["params"])


def test_main_names_an_adamw_table_by_its_optimizer(monkeypatch, tmp_path):
    _stand_ins(monkeypatch)
    _fake_clock(monkeypatch, SECONDS)
    argv = ["--models", "zoo_poolformer_s12", "--batch", "2", "--img-size", "8", "--repeats", "1", "--warmup", "0"]
    assert speed.main([*argv, "--optim", "adamw", "--out", str(tmp_path)]) == 0
    kind = machine_slug(speed.describe().record())
    meta = json.loads((tmp_path / f"speed_cpu_fp32_adamw_{kind}.json").read_text())
    assert meta["settings"]["optim"] == "adamw"
    assert "train step with the zoo's AdamW" in (tmp_path / f"speed_cpu_fp32_adamw_{kind}.md").read_text()
    spread = (tmp_path / "speed_cpu_fp32_adamw_machines.md").read_text().splitlines()
    assert _cells(spread[4])[3] == "fp32, batch 2, adamw"


@pytest.mark.parametrize(
    ("cpu_model", "capability", "flags", "kind"),
    [
        ("AMD EPYC", "AVX512", ["avx512_bf16"], "amd-epyc-avx512-bf16"),
        ("AMD EPYC 9654 96-Core Processor", "AVX512", ["avx512_bf16"], "amd-epyc-avx512-bf16"),
        ("Intel(R) Xeon(R) Processor", "AVX512", ["avx512_bf16", "amx_bf16"], "intel-xeon-avx512-amx"),
        ("Intel(R) Xeon(R) Platinum 8480+", "AVX512", ["avx512_bf16", "amx_bf16"], "intel-xeon-avx512-amx"),
        ("Intel(R) Core(TM) i7-1165G7 CPU @ 2.80GHz", "AVX2", [], "intel-core-avx2"),
        ("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", "AVX512", None, "intel-xeon-avx512"),
    ],
)
def test_machine_kind_is_the_cpu_line_and_its_units(cpu_model, capability, flags, kind):
    record = {"cpu_model": cpu_model, "cpu_capability": capability, "cpu_flags": flags, "gpu": "NVIDIA H200"}
    assert machine_slug(record) == kind
    assert machine_slug(record, "cuda:0") == "nvidia-h200"  # a GPU run: the GPU is the kind


def _result(tmp_path, name, cpu_model, flags, date, ratios, **settings):
    """A results JSON as the bench writes it (the fields the spread reads), named for its machine."""
    result = {
        "date": date,
        "commit": "abc1234",
        "threads": 2,
        "cpu_model": cpu_model,
        "cpu_capability": "AVX512",
        "cpu_flags": flags,
        "settings": {"dtype": "fp32", "batch": 32, "device": "cpu", **settings},
        "rows": [{"model": m, "twin": m, "train_ratio": r, "train_ratio_ci": 0.1} for m, r in ratios.items()],
    }
    (tmp_path / f"{name}_{machine_slug(result)}.json").write_text(json.dumps(result))


def test_spread_has_one_row_per_machine_kind_newest_first(tmp_path, capsys):
    _result(tmp_path, "toy", "AMD EPYC", ["avx512_bf16"], "2026-12-02T03:57:11+00:00", {"a": 1.08, "b": 0.9})
    xeon = ["avx512_bf16", "amx_bf16"]
    _result(
        tmp_path, "toy", "Intel(R) Xeon(R) Processor", xeon, "2026-12-04T10:00:00+00:00", {"a": 0.97}, optim="adamw"
    )
    _result(tmp_path, "toy_subset", "AMD EPYC", ["avx512_bf16"], "2026-12-05T00:00:00+00:00", {"a": 5.0})  # not toy's
    assert speed.main(["--spread-only", "--out", str(tmp_path), "--name", "toy"]) == 0
    lines = (tmp_path / "toy_machines.md").read_text().splitlines()
    assert _cells(lines[2]) == ["machine", "date", "threads", "setting", "a", "b"]
    rows = [_cells(line) for line in lines[4:6]]
    assert rows[0][:3] == ["Intel(R) Xeon(R) Processor (AVX512, avx512_bf16, amx_bf16)", "2026-12-04", "2"]
    assert rows[0][3:] == ["fp32, batch 32, adamw", "0.97x ± 0.10", "-"]  # model b not measured there
    assert rows[1][:2] == ["AMD EPYC (AVX512, avx512_bf16)", "2026-12-02"]
    assert rows[1][3:] == ["fp32, batch 32, sgd", "1.08x ± 0.10", "0.90x ± 0.10"]  # a file without optim: SGD
    assert lines[6] == "" and "toy_intel-xeon-avx512-amx.md" in lines[7] and "toy_amd-epyc-avx512-bf16.md" in lines[7]
    assert not (tmp_path / "toy_compiled_machines.md").exists()  # no compiled results: no spread


def test_the_committed_speed_results_read_into_a_spread(tmp_path):
    """The results files of the repository (renamed for their machine) are found and read."""
    committed = sorted(speed.RESULTS.glob("speed_cpu_fp32_amd-epyc-avx512-bf16.json"))
    assert committed, "zoo/bench/results/speed_cpu_fp32_<machine>.json is missing"
    for path in committed:
        (tmp_path / path.name).write_text(path.read_text())
    assert speed.main(["--spread-only", "--out", str(tmp_path)]) == 0
    rows = json.loads(committed[0].read_text())["rows"]
    lines = (tmp_path / "speed_cpu_fp32_machines.md").read_text().splitlines()
    header, cells = _cells(lines[2]), _cells(lines[4])
    for r in rows:
        if r.get("twin"):
            assert cells[header.index(r["model"])] == f"{r['train_ratio']:.2f}x ± {r['train_ratio_ci']:.2f}"


def test_main_rejects_an_unknown_layout(capsys):
    assert speed.main(["--layouts", "nhwc"]) == 2
    assert "expected some of nchw, channels_last" in capsys.readouterr().err


def test_the_cvt_twin_needs_transformers_one_line(monkeypatch, capsys):
    real = twins.importlib.util.find_spec
    monkeypatch.setattr(
        twins.importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    assert twins.missing("zoo_vit_tiny_patch16_224") is None
    assert speed.main(["--models", "zoo_cvt_13"]) == 2
    assert capsys.readouterr().err == "zoo.bench speed: the CvT twin needs transformers: pip install transformers\n"


def _randomised(model: nn.Module) -> nn.Module:
    """Every weight and BatchNorm statistic drawn at random, so that a mis-mapped key shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                noise = torch.rand(value.shape, generator=gen)
                value.copy_(noise + 0.5 if key.endswith("running_var") else (noise - 0.5) * 0.4)
    return model


@pytest.mark.parametrize("name,img_size", [("zoo_cvt_mini_32", 32), ("zoo_cvt_13", 32)])
def test_cvt_twin_computes_the_zoo_function(name, img_size):
    pytest.importorskip("transformers", reason=twins.NEEDS_TRANSFORMERS)
    ours = _randomised(zoo.create_model(name)).eval()
    twin = twins.cvt_twin(ours).eval()
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in ours.parameters())
    assert twins.max_output_diff(ours, twin, img_size) <= 1e-4
    if name == "zoo_cvt_mini_32":  # the QuickGELU swap is what makes them agree
        from transformers.activations import QuickGELUActivation

        for module in twin.modules():
            if isinstance(module, QuickGELUActivation):
                module.forward = nn.functional.gelu
        assert twins.max_output_diff(ours, twin, img_size) > 1e-3


@pytest.mark.parametrize("name", ["zoo_poolformerv2_s12", "zoo_convformer_s18", "zoo_caformer_s18"])
def test_metaformer_twins_compute_timms_function(name):
    from zoo.bench import twins

    _, ref, diff = twins.twin_pair(name, 64)
    assert twins.twin_label(name) == name.removeprefix("zoo_") and ref is not None
    assert diff < 1e-4, diff  # the overrides in TWINS (timm's MLP-head norm) make it timm's function


def test_cvt_twin_row(monkeypatch):
    pytest.importorskip("transformers", reason=twins.NEEDS_TRANSFORMERS)
    monkeypatch.setattr(speed, "_peak_memory_in_child", lambda name, **kw: {"zoo": 0, "twin": 0})
    r = speed.measure(["zoo_cvt_mini_32"], batch=1, img_size=32, repeats=1, warmup=0, dtype="fp32", device=CPU)[0]
    assert r["twin"] == "transformers CvtForImageClassification" and r["max_diff"] <= 1e-4
    assert r["twin_layout"] in speed.LAYOUTS and r["train_ratio"] > 0


def test_cvt_config_refuses_what_the_twin_cannot_compute():
    pytest.importorskip("transformers", reason=twins.NEEDS_TRANSFORMERS)
    import dataclasses

    spec = zoo.create_model("zoo_cvt_mini_32").spec
    gelu = dataclasses.replace(
        spec, stages=(*spec.stages[:2], dataclasses.replace(spec.stages[2], channel_options={"act": "gelu"}))
    )
    with pytest.raises(ValueError, match="stage 2: act='gelu'; transformers' CvT twin computes 'quick_gelu'"):
        twins.cvt_config(gelu)


def test_speed_against_the_timm_twin_end_to_end():
    # The real twins, both layouts, one repeat: the ratios are the measured images/s divided.
    r = speed.measure(
        ["zoo_vit_tiny_patch16_224"], batch=1, img_size=32, repeats=1, warmup=0, dtype="fp32", device=CPU
    )[0]
    assert r["twin"] == "vit_tiny_patch16_224" and r["max_diff"] <= 1e-4
    assert r["params_m"] == pytest.approx(5.7, abs=0.05) and r["unsupported"] == ""
    assert r["train_ratio"] == pytest.approx(r["train_ips"] / r["twin_train_ips"])
    assert r["eval_ratio"] == pytest.approx(r["eval_ips"] / r["twin_eval_ips"])
    assert r["twin_train_ips"] == max(r["twin_train_ips_nchw"], r["twin_train_ips_channels_last"])
    assert r["train_ratio"] == pytest.approx(min(r["train_ratio_nchw"], r["train_ratio_channels_last"]))
    assert math.isnan(r["train_ratio_ci"])  # one repeat: no spread known, and the row says so
    assert "±" not in speed.format_row(r)
    assert 0 < r["peak_mem_mb"] and 0 < r["twin_peak_mem_mb"]


def test_cpu_peak_memory_counts_live_tensor_bytes():
    with speed.PeakMemory(CPU) as mem:
        a = torch.empty(2**20, dtype=torch.uint8)
        b = torch.empty(2 * 2**20, dtype=torch.uint8)
        del a  # 3 MiB live at the peak, then 2 MiB, then 2.5 MiB
        c = torch.empty(2**19, dtype=torch.uint8)
        del b, c
    assert mem.peak == 3 * 2**20
    assert speed.peak_live_bytes([(2, -5), (0, 10), (1, 4), (3, 8)]) == 17  # summed in time order


def test_speed_peak_memory_does_not_depend_on_what_ran_before():
    # RSS growth read 0 MB for a model measured after a bigger one: the tensor peak must not. In this
    # process, one after the other (the bench runs each in a fresh child: the end-to-end test above).
    def peak(name, batch):
        return (
            speed.peak_memory_here(
                name,
                batch=batch,
                img_size=32,
                dtype="fp32",
                device="cpu",
                layouts={"zoo": "nchw", "twin": "nchw"},
                threads=1,
            )["zoo"]
            / 2**20
        )

    small_first = peak("zoo_vit_tiny_patch16_224", 2)
    large = peak("zoo_vit_tiny_patch16_224", 8)
    assert peak("zoo_vit_tiny_patch16_224", 2) == pytest.approx(small_first, rel=0.02)
    grads_mb = 5.7e6 * 4 / 2**20  # every train step allocates its gradients anew (zero_grad sets them to None)
    assert grads_mb < small_first < large  # and the activations grow with the batch
