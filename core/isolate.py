"""Run a torch-heavy step in a fresh Python process, so the memory it takes goes back to the system when it ends
(a CLI process that loaded a model with torch kept ~650 MB more for the rest of a deploy, benchmark included)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable
from typing import Any


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) in a spawned process; its result is returned and its exception re-raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()
