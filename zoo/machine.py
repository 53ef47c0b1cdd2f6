"""What this machine can do, decided once: precision, threads and loader workers, and the
description every run and benchmark records beside its figures.

Why precision is decided here and not by a recipe: bf16 autocast is fast only where the device
computes bf16 natively (a CUDA GPU of compute capability 8.0 or newer; a CPU whose kernels use
AVX512_BF16 or AMX). Elsewhere PyTorch emulates it, and on an AVX2-only CPU a train step of the
default model runs several times slower than in fp32 (DESIGN.md, "Training"). So a recipe says
``auto`` and the run says what it chose and why.

Every decision reads a ``Machine`` description, which tests build by hand: the rules are checked
for an AVX2 CPU, an AVX-512-BF16 one and a bf16 GPU on whatever machine runs the tests.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "Machine",
    "ThreadPlan",
    "busy_cores",
    "describe",
    "keep_freed_memory",
    "plan_threads",
    "resolve_precision",
]

# CPU flags (/proc/cpuinfo) whose kernels compute bf16 natively: AVX512_BF16 (Cooper Lake, Zen 4+),
# AMX (Sapphire Rapids+), and Arm's BF16 extension.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# torch.backends.cpu.get_cpu_capability() values whose kernels can use those flags. An override
# such as ATEN_CPU_CAPABILITY=avx2 keeps torch off them even on a CPU that has the flags.
_BF16_CAPABILITIES = ("AVX512", "SVE", "SVE256")


@dataclass(frozen=True)
class Machine:
    """The facts the decisions depend on (``describe()`` reads them from this machine)."""

    cpu_model: str
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability()
    cpu_flags: tuple[str, ...]  # the bf16-relevant flags present, e.g. ("avx512_bf16",)
    cores: int  # cores this process may run on (os.sched_getaffinity)
    gpu: str | None = None  # CUDA device name, None without one
    gpu_bf16: bool = False  # torch.cuda.is_bf16_supported() natively

    @property
    def cpu_native_bf16(self) -> bool:
        return self.cpu_capability in _BF16_CAPABILITIES and any(f in self.cpu_flags for f in _BF16_CPU_FLAGS)

    def summary(self) -> str:
        """One line for logs and benchmark output."""
        flags = ",".join(self.cpu_flags) or "no bf16 flags"
        gpu = f", GPU {self.gpu}" + (" (bf16)" if self.gpu_bf16 else "") if self.gpu else ""
        return f"{self.cpu_model} ({self.cpu_capability}, {flags}), {self.cores} cores usable{gpu}"

    def record(self) -> dict:
        """The description plus the software versions, for metrics.jsonl and results files."""
        import timm

        return {
            **asdict(self),
            "cpu_native_bf16": self.cpu_native_bf16,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
        }


def _cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and its bf16 flags, from the first processor of /proc/cpuinfo."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:  # not Linux
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set((info.get("flags") or info.get("Features") or "").split())  # x86 / Arm
    if not info and torch.cpu._is_avx512_bf16_supported():  # no cpuinfo: ask torch
        flags.add("avx512_bf16")
    return model, tuple(f for f in _BF16_CPU_FLAGS if f in flags)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def describe() -> Machine:
    """This machine, as the decisions below see it."""
    model, flags = _cpu_model_and_flags()
    gpu, gpu_bf16 = None, False
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        gpu_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return Machine(
        cpu_model=model,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=flags,
        cores=usable_cores(),
        gpu=gpu,
        gpu_bf16=gpu_bf16,
    )


def resolve_precision(requested: str, machine: Machine, device_type: str) -> tuple[str, str]:
    """``(precision, why)`` for ``train.precision`` on ``device_type`` ("cpu" or "cuda").

    ``auto`` picks bf16 where it is native and fp32 otherwise (fp16 never: it needs a loss scale
    and a recipe that expects it). An explicit ``bf16`` where it is emulated runs, with a warning.
    """
    if device_type == "cuda":
        native, where = machine.gpu_bf16, f"GPU {machine.gpu}"
    else:
        native, where = machine.cpu_native_bf16, f"CPU {machine.cpu_capability}"
    if requested == "auto":
        if native:
            return "bf16", f"auto: this {where} computes bf16 natively"
        return "fp32", f"auto: this {where} has no native bf16 ({machine.summary()})"
    if requested == "bf16" and not native:
        warnings.warn(
            f"train.precision: bf16 is emulated on this {where} ({machine.summary()}): expect steps "
            "several times slower than fp32; train.precision=auto picks fp32 here",
            stacklevel=2,
        )
        return "bf16", f"as configured, emulated on this {where}"
    return requested, "as configured"


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # torch compute threads of this process
    workers: int  # DataLoader worker processes of this process
    cores: int  # cores this process may use (its share of the machine's usable cores)
    busy: int  # cores other processes kept busy when the plan was made (1-minute load average)

    def summary(self) -> str:
        busy = f", ~{self.busy} busy with other processes" if self.busy else ""
        return (
            f"{self.threads} compute thread{'s' * (self.threads != 1)} + {self.workers} loader "
            f"worker{'s' * (self.workers != 1)} ({self.cores} cores for this process{busy})"
        )


def busy_cores(interval: float = 0.25) -> float:
    """Cores other processes keep busy now: the non-idle CPU time of the whole machine over
    ``interval`` seconds (/proc/stat), in cores. 0 where that cannot be read. Measured, not the
    load average, which lags by a minute (the ``pip install`` before a first run would count)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    elapsed = total1 - total0
    return (os.cpu_count() or 1) * (elapsed - (idle1 - idle0)) / elapsed if elapsed > 0 else 0.0


def plan_threads(
    machine: Machine,
    local_processes: int = 1,
    threads: int | None = None,
    workers: int | None = None,
    busy: float | None = None,
) -> ThreadPlan:
    """Compute threads and loader workers for one of ``local_processes`` on this machine.

    Each process gets its share of the usable cores. Loader workers default to a quarter of that
    share (none below 4 cores: the embedded datasets decode nothing, and a worker would take a
    core that a compute thread uses better), compute threads to the rest less the cores other
    processes keep busy, and never more threads than cores minus workers. Why subtract the busy
    cores: OpenMP threads wait for each other at every op, so one thread that has to share its
    core with another process slows all of them several-fold; fewer threads keep the run time
    predictable. ``busy`` is measured by ``busy_cores()`` when None, for a single process only
    (the ranks of a multi-process run start together and would see each other). Explicit values
    are kept as given.
    """
    share = max(1, machine.cores // max(1, local_processes))
    if workers is None:
        workers = share // 4
    if threads is None:
        if busy is None:
            busy = busy_cores() if local_processes == 1 else 0.0
        busy = min(int(busy + 0.5), max(0, share - workers - 1))
        threads = max(1, share - workers - busy)
    return ThreadPlan(threads=threads, workers=workers, cores=share, busy=int(busy or 0))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Larger than any one activation buffer a training step allocates here (a 224-pixel ImageNet
# model's first-stage hidden map at batch 128 is ~400 MB); whatever is bigger is still mmapped.
_KEEP_BELOW = 1 << 30


def keep_freed_memory() -> str | None:
    """Make glibc keep freed memory in the process for the next allocation instead of handing it
    back to the kernel; returns what was set (a line for the log), or None where nothing was
    (not Linux/glibc).

    Why: by default glibc serves every buffer over its mmap threshold (dynamic, at most 32 MB) with
    a fresh mmap and unmaps it on free, and trims the heap's free top beyond twice that. A train
    step allocates and frees the same activation and gradient buffers every step, so the kernel
    zero-fills them again page by page every step (tests/test_machine.py counts the page faults of
    the default model's step with and without; the README's first paragraph times a whole run
    both ways). The cost is that the process's resident memory stays at
    its peak instead of shrinking between steps, which a training process reaches every step
    anyway. Process-wide, so only the training loop calls it (``ZOO_ALLOCATOR=system`` skips it), and
    the MoE benchmark, which times layers the loop trains; the benchmarks that time us against timm
    do not, as it would speed up both sides.
    """
    if not sys.platform.startswith("linux"):
        return None
    if any(m in os.environ.get("LD_PRELOAD", "") for m in ("jemalloc", "tcmalloc", "mimalloc")):
        return None  # another malloc serves the process: glibc's settings would change nothing
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt  # glibc's; musl has no libc.so.6 / mallopt
    except (OSError, AttributeError):
        return None
    # glibc before 2.35 refuses an mmap threshold over 32 MB (HEAP_MAX_SIZE / 2): keep that much
    for limit in (_KEEP_BELOW, 32 << 20):
        if mallopt(_M_MMAP_THRESHOLD, limit) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW):
            size = f"{limit >> 30} GB" if limit >= 1 << 30 else f"{limit >> 20} MB"
            return f"freed memory kept for reuse (glibc: buffers under {size} from the heap, heap trimmed above 1 GB)"
    return None
