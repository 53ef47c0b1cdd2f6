"""Precision and threads follow the hardware: the rules read a machine description, so every case
(AVX2-only CPU, AVX-512-BF16 / AMX CPU, bf16 GPU) is checked on whatever machine runs the tests."""

from __future__ import annotations

import pytest

from zoo.machine import Machine, describe, plan_threads, resolve_precision

AVX2_EPYC = Machine(cpu_model="AMD EPYC 7B12", cpu_capability="AVX2", cpu_flags=(), cores=2)
ZEN4 = Machine(cpu_model="AMD EPYC 9B14", cpu_capability="AVX512", cpu_flags=("avx512_bf16",), cores=2)
SAPPHIRE = Machine(cpu_model="Intel Xeon Platinum 8481C", cpu_capability="AVX512", cpu_flags=("amx_bf16",), cores=8)
# AVX-512 without its BF16 extension (Skylake/Cascade Lake): bf16 is emulated there too.
SKYLAKE = Machine(cpu_model="Intel Xeon Gold 6148", cpu_capability="AVX512", cpu_flags=(), cores=4)
# A CPU with the flag whose torch was told to stay on AVX2 kernels (ATEN_CPU_CAPABILITY=avx2).
PINNED_AVX2 = Machine(cpu_model="AMD EPYC", cpu_capability="AVX2", cpu_flags=("avx512_bf16",), cores=2)
H100 = Machine(
    cpu_model="Intel Xeon", cpu_capability="AVX512", cpu_flags=(), cores=16, gpu="NVIDIA H100", gpu_bf16=True
)
T4 = Machine(cpu_model="Intel Xeon", cpu_capability="AVX2", cpu_flags=(), cores=4, gpu="Tesla T4", gpu_bf16=False)


@pytest.mark.parametrize(
    ("machine", "device", "expected"),
    [
        (AVX2_EPYC, "cpu", "fp32"),
        (SKYLAKE, "cpu", "fp32"),
        (PINNED_AVX2, "cpu", "fp32"),
        (ZEN4, "cpu", "bf16"),
        (SAPPHIRE, "cpu", "bf16"),
        (H100, "cuda", "bf16"),
        (T4, "cuda", "fp32"),
    ],
)
def test_auto_precision_is_bf16_only_where_native(machine, device, expected):
    precision, why = resolve_precision("auto", machine, device)
    assert precision == expected
    assert why.startswith("auto: ")
    if expected == "fp32":
        assert "no native bf16" in why


def test_the_reason_names_the_cpu_capability():
    _, why = resolve_precision("auto", AVX2_EPYC, "cpu")
    assert "CPU AVX2 has no native bf16" in why and "AMD EPYC 7B12" in why


def test_explicit_bf16_on_an_emulating_cpu_runs_with_one_warning():
    with pytest.warns(UserWarning, match="bf16 is emulated on this CPU AVX2.*several times slower") as record:
        assert resolve_precision("bf16", AVX2_EPYC, "cpu")[0] == "bf16"
    assert len(record) == 1


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_explicit_precisions_are_kept_where_native(requested, recwarn):
    assert resolve_precision(requested, H100, "cuda")[0] == requested
    assert not [w for w in recwarn if "emulated" in str(w.message)]


@pytest.mark.parametrize(
    ("cores", "busy", "threads", "workers"),
    [
        (1, 0, 1, 0),
        (2, 0, 2, 0),  # an idle 2-core machine: both cores compute, the embedded data needs no worker
        (2, 1, 1, 0),  # another process holds a core: one thread, not two fighting over it
        (2, 5, 1, 0),  # always at least one thread
        (4, 0, 3, 1),
        (8, 0, 6, 2),
        (16, 3, 9, 4),
    ],
)
def test_threads_and_workers_fit_the_free_cores(cores, busy, threads, workers):
    plan = plan_threads(Machine("cpu", "AVX2", (), cores), busy=busy)
    assert (plan.threads, plan.workers) == (threads, workers)
    assert plan.threads + plan.workers <= max(cores, 1 + plan.workers)
    assert f"{threads} compute thread" in plan.summary()


def test_processes_share_the_cores_and_explicit_values_are_kept():
    machine = Machine("cpu", "AVX512", (), 16)
    plan = plan_threads(machine, local_processes=4, busy=0)
    assert (plan.cores, plan.threads, plan.workers) == (4, 3, 1)
    plan = plan_threads(machine, threads=5, workers=0)
    assert (plan.threads, plan.workers) == (5, 0)
    # explicit workers beyond the share still leave one compute thread
    assert plan_threads(Machine("cpu", "AVX2", (), 2), workers=10, busy=0).threads == 1


def test_this_machine_is_described():
    m = describe()
    assert m.cores >= 1 and m.cpu_capability
    record = m.record()
    for key in ("cpu_model", "cpu_capability", "cpu_native_bf16", "torch", "timm", "cores"):
        assert key in record
    assert m.cpu_capability in m.summary()


FAULTS_PER_TRAIN_STEP = """
import resource, sys, torch, zoo
from zoo.machine import keep_freed_memory
said = str(keep_freed_memory()) if sys.argv[1] == "keep" else "-"
torch.manual_seed(0)
model = zoo.create_model("zoo_poolformer_mini_32", num_classes=10).to(memory_format=torch.channels_last)
x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters())
def step():
    model(x).logsumexp(1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):  # warm-up: the heap grows to a step's peak
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(said, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def _faults_per_step(mode: str) -> tuple[str, int]:
    import os
    import subprocess
    import sys

    # glibc's own settings only: no preloaded malloc, no MALLOC_*/GLIBC_TUNABLES from the caller
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_TRAIN_STEP, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=env,
    ).stdout.split()
    return " ".join(out[:-1]), int(out[-1])


def test_freed_memory_is_kept_for_the_next_step():
    """The default model's train step (batch 64, fp32) allocates the same buffers every step: with
    freed memory kept, they come back without the kernel zero-filling fresh pages."""
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or "libc.so.6" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("glibc's mallopt: Linux with glibc only")
    try:  # with huge pages always on, a fault maps 2 MB: the counts below assume 4 KB pages
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        thp = ""
    if "[always]" in thp:
        pytest.skip("transparent huge pages are 'always' here: page-fault counts are not 4 KB pages")
    said, kept = _faults_per_step("keep")
    if said == "None":
        pytest.skip("this glibc refused the settings (keep_freed_memory returned None)")
    assert said.startswith("freed memory kept for reuse"), said
    _, default = _faults_per_step("system")
    assert default > 2000, f"only {default} page faults per step with glibc's defaults: nothing to keep"
    assert kept < default // 20, f"{kept} page faults per step with freed memory kept, {default} without"
