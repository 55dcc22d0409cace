"""How many CPUs this process may use: its CPU affinity and its cgroup's CPU quota, whichever is smaller. Every
thread setting slmops honours is checked against it, so no value makes slmops run more compute threads than that.
And how much memory it may still take (the machine's available memory, capped by its cgroup's limit)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from slmops.errors import UsageError

THREADS_ENV = "SLMOPS_THREADS"  # ONNX Runtime's intra-op threads in slmops's sessions (the GGUF kernel runs on them)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs the cgroup's quota allows (rounded up), None where no quota is set or none can be read."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None


def allowed_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, quota) if quota else count)


T = TypeVar("T")
R = TypeVar("R")


def in_threads(work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """work(item) for each item, in order, on at most allowed_cpus() threads (numpy's array loops let go of the GIL,
    so row-wise numpy work runs on every CPU allowed); on the calling thread where one CPU is allowed."""
    threads = min(allowed_cpus(), len(items))
    if threads <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="slmops-rows") as pool:
        return list(pool.map(work, items))


def row_slices(rows: int, parts: int, most: int | None = None, least: int = 32) -> list[slice]:
    """rows split into parts equal runs (fewer where runs would be shorter than least rows; more where they would be
    longer than most)."""
    count = max(1, min(parts, rows // least))
    if most:
        count = max(count, math.ceil(rows / most))
    edges = [round(i * rows / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a] or [slice(0, rows)]  # none: one


def by_row_runs(work: Callable[[slice], tuple], rows: int, most: int | None = None, least: int = 32) -> tuple:
    """work(run) for runs of rows (row_slices over the CPUs allowed, on in_threads), each array it returns joined
    back in row order: row-wise numpy work on every CPU allowed, the same result on one."""
    import numpy as np

    runs = in_threads(work, row_slices(rows, allowed_cpus(), most, least))
    return tuple(np.concatenate(values) for values in zip(*runs, strict=True))


def session_threads() -> int | None:
    """The intra-op threads of an ONNX Runtime session slmops opens: SLMOPS_THREADS where set, else the CPUs this
    process may use where that is fewer than the machine has (ONNX Runtime's own default counts the machine's cores),
    else None (the folder's setting: ONNX Runtime's default)."""
    check_thread_settings()
    value = os.environ.get(THREADS_ENV)
    if value:
        return int(value)
    allowed = allowed_cpus()
    return allowed if allowed < (os.cpu_count() or 1) else None


def check_thread_settings() -> None:
    """Refuse, before any work, a thread setting outside 1..allowed_cpus()."""
    value = os.environ.get(THREADS_ENV)
    if value is None or value == "":
        return
    limit = allowed_cpus()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if not 1 <= threads <= limit:
        raise UsageError(
            f"{THREADS_ENV}={value!r} is not a thread count this process may use: give 1 to {limit} "
            f"(the CPUs its affinity and CPU quota allow), or unset it to use them all"
        )


def available_memory(root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may still take: the machine's available memory, capped by what its cgroup's limit leaves
    (cgroup v2 memory.max - memory.current)."""
    import psutil

    free = psutil.virtual_memory().available
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, free)
