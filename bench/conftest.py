"""Shared benchmark plumbing: timing of finished work, peak memory, and a ratio table.

Every benchmark records (group, variant, seconds, peak bytes) through the ``bench_record``
fixture; at the end of the run a table prints each variant's speed and memory as a ratio against
the group's baseline (``reference``), all measured side by side in the same run.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)
_TARGETS: dict[tuple[str, str], float] = {}
_LAUNCHES: dict[str, dict[str, int]] = defaultdict(dict)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_time_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median time of fn on the GPU from CUDA events (triton.testing.do_bench when present)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except ImportError:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def peak_bytes(fn, device: str) -> int:
    """Peak memory that fn allocates above what is live before it.

    CUDA: the caching allocator's peak. CPU: the running sum, in call order, of each profiled op's
    own allocations minus its frees (torch.profiler, profile_memory=True).
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


@pytest.fixture
def bench_record(benchmark):
    """Run fn under pytest-benchmark (finished work: the GPU is synchronized inside) and record
    time and peak memory for the ratio table."""

    def run(group: str, variant: str, fn, device: str, rounds: int | None = None, baseline: str = "reference",
            target: float | None = None):
        def timed():
            fn()
            sync(device)

        if rounds is None:
            rounds = int(os.environ.get("RGA_BENCH_ROUNDS", "3"))
        timed()  # warm-up outside the timed rounds (compilation, autotuning, allocator)
        benchmark.group = group
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1 if device == "cuda" else 0)
        seconds = benchmark.stats.stats.median
        if device == "cuda":
            seconds = gpu_time_ms(fn) / 1e3
        peak = peak_bytes(fn, device)
        benchmark.extra_info.update({"peak_bytes": peak, "median_s": seconds, "device": device})
        _RESULTS[group][variant] = {"s": seconds, "peak": peak, "baseline": baseline}
        if target is not None:
            _TARGETS[(group, variant)] = target

    return run


@pytest.fixture
def launch_record(benchmark):
    """Count the kernel-launching ops of fn (rga_kernels.launches) after one warm-up call, and
    record them for the launch table; pytest-benchmark times the counted run (it includes the
    profiler's overhead: the time column of that row means nothing, the count does)."""
    from rga_kernels.launches import count_launches

    def run(group: str, variant: str, fn):
        fn()
        benchmark.group = "launches: " + group
        counts = []
        benchmark.pedantic(lambda: counts.append(count_launches(fn)), rounds=1, iterations=1)
        _LAUNCHES[group][variant] = counts[-1]
        benchmark.extra_info["launches"] = counts[-1]

    return run


def _missed_targets() -> list[str]:
    missed = []
    for (group, variant), target in _TARGETS.items():
        base = _RESULTS[group].get(_RESULTS[group][variant]["baseline"])
        if base and base["s"] / _RESULTS[group][variant]["s"] < target:
            missed.append(f"{group} {variant}: {base['s'] / _RESULTS[group][variant]['s']:.1f}x < {target:g}x")
    return missed


def pytest_sessionfinish(session, exitstatus):
    """RGA_BENCH_ENFORCE=1 turns a missed speed-up target into a failed run (off by default: on a
    shared machine a loaded moment is not a regression)."""
    if os.environ.get("RGA_BENCH_ENFORCE") == "1" and _missed_targets() and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if _LAUNCHES:
        tr.section("operator launches per call (rga_kernels.launches), against the reference path")
        for group, variants in _LAUNCHES.items():
            base = variants.get("reference")
            row = "  ".join(f"{v} {n}" + (f" ({n / base:.2f}x)" if base and v != "reference" else "")
                            for v, n in variants.items())
            tr.write_line(f"{group:<40} {row}")
    if not _RESULTS:
        return
    tr.section("speed and peak memory against the baseline, measured side by side in this run")
    tr.write_line(f"{'group':<44} {'variant':<12} {'median':>10} {'speedup':>9} {'peak MiB':>10} {'mem ratio':>9}  target")
    for group, variants in _RESULTS.items():
        for variant, r in variants.items():
            base = variants.get(r["baseline"])
            speed = f"{base['s'] / r['s']:.1f}x" if base and variant != r["baseline"] else "-"
            mem = (f"{r['peak'] / base['peak']:.3f}" if base and base["peak"] > 0 and variant != r["baseline"]
                   else "-")
            target = _TARGETS.get((group, variant))
            verdict = ""
            if target is not None and base:
                verdict = f">= {target:g}x: {'met' if base['s'] / r['s'] >= target else 'NOT met'}"
            tr.write_line(f"{group:<44} {variant:<12} {r['s'] * 1e3:>8.2f}ms {speed:>9} "
                          f"{r['peak'] / 2**20:>10.1f} {mem:>9}  {verdict}")
    missed = _missed_targets()
    if missed and os.environ.get("RGA_BENCH_ENFORCE") == "1":
        tr.write_line("RGA_BENCH_ENFORCE=1 and targets missed: " + "; ".join(missed), red=True)
