"""Run a torch-heavy step in a fresh Python process, so the memory it takes goes back to the system when it ends
(a CLI process that loaded a model with torch kept ~650 MB more for the rest of a deploy, benchmark included).
Children end with their parent: a killed slmops leaves no builder running on."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def die_with_parent(parent: int | None = None) -> None:
    """In a child: ask Linux to SIGKILL it when its parent dies (even by kill -9). Elsewhere a no-op. parent: the
    pid the child was started by; a parent that died before the request was made (the child would then run its
    task to the end, seen in test_fault_injection) ends the child at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if parent is not None and os.getppid() != parent:
            os._exit(1)


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) in a spawned process; its result is returned and its exception re-raised here."""
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        return pool.submit(function, *args).result()
