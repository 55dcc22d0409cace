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
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from slmops.errors import SlmopsError

UNGUARDED = (
    "slmops was called at the top level of a script that its child process imports again (Python's spawn start "
    'method runs the script\'s top level in every child): put the call under `if __name__ == "__main__":`'
)


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


def refuse_while_bootstrapping() -> None:
    """In a spawned child still importing its parent's main script: refuse, in one line. A script that calls slmops
    at its top level runs that call again in each child, where a lock its parent holds (the build's) kept it waiting
    until the lock's timeout. Called by fsutil.lock and in_child. multiprocessing's own check
    (spawn._check_not_importing_main) reads the same flag."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SlmopsError(UNGUARDED)


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) in a spawned process; its result is returned and its exception re-raised here."""
    refuse_while_bootstrapping()
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            raise SlmopsError(
                f"the child process running {function.__name__} ended before it finished: it was killed (out of "
                f"memory?), or {UNGUARDED[0].lower()}{UNGUARDED[1:]}"
            ) from None
