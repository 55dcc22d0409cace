"""Run a torch-heavy step in a fresh Python process, so the memory it takes goes back to the system when it ends
(a CLI process that loaded a model with torch kept ~650 MB more for the rest of a deploy, benchmark included).
Children end with their parent: a killed slmops leaves no builder running on.

Torch steps (warm=True) start from a fork server that imported torch and transformers once: re-importing them was
most of a small step's time (a tiny model's source logits: 5.1 s in a spawned child, 0.7 s forked from the server).
The server holds only those imports (~400 MB, shared with its children, nothing a step loaded) and ends with slmops
or at release()."""

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


def die_with_parent(parent: int | None = None, via: int | None = None) -> None:
    """In a child: ask Linux to SIGKILL it when its parent dies (even by kill -9). Elsewhere a no-op. parent: the
    pid of the slmops process the child works for; a parent that died before the request was made (the child would
    then run its task to the end, seen in test_fault_injection) ends the child at once. via: the fork server the
    child was forked from, its actual parent, which ends when slmops does."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if parent is not None and os.getppid() != (via or parent):
            os._exit(1)
        if via is not None:
            _let_the_server_end()
            if not _alive(parent):
                os._exit(1)


def _let_the_server_end() -> None:
    """In a child of the fork server: close the child's copy of the pipe whose end tells the server that slmops is
    gone (multiprocessing gives every child one, so the server would wait for its children, and they for it)."""
    from multiprocessing import forkserver

    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        forkserver._forkserver._forkserver_alive_fd = None


def _alive(pid: int | None) -> bool:
    try:
        return pid is None or os.kill(pid, 0) is None
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (a reused pid): not ours, but not a reason to stop here
        return True


def refuse_while_bootstrapping() -> None:
    """In a spawned child still importing its parent's main script: refuse, in one line. A script that calls slmops
    at its top level runs that call again in each child, where a lock its parent holds (the build's) kept it waiting
    until the lock's timeout. Called by fsutil.lock and in_child. multiprocessing's own check
    (spawn._check_not_importing_main) reads the same flag."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SlmopsError(UNGUARDED)


# What the fork server imports once: torch, transformers, the model builder and the model code of the tested
# families (a family's modeling module is imported when its first model loads; a module not installed is skipped).
TORCH_MODULES = [
    "torch",
    "transformers",
    "onnxruntime_genai.models.builder",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    *(
        f"transformers.models.{family}.modeling_{family}"
        for family in ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mistral", "granite", "smollm3")
    ),
]


def in_child(function: Callable[..., Any], *args: Any, warm: bool = False) -> Any:
    """function(*args) in a fresh child process; its result is returned and its exception re-raised here. warm: a
    torch step, forked from the fork server that has torch imported (with this process's environment as it is
    now); otherwise a spawned interpreter."""
    refuse_while_bootstrapping()
    if warm:
        from multiprocessing import forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(TORCH_MODULES)  # read when the server starts
        if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:
            _socket_folder()
        forkserver.ensure_running()
        server = getattr(forkserver._forkserver, "_forkserver_pid", None)
        init, run = (os.getpid(), server), (_in_environment, dict(os.environ), function, *args)
    else:
        context, init, run = multiprocessing.get_context("spawn"), (os.getpid(),), (function, *args)
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=die_with_parent, initargs=init) as pool:
        try:
            return pool.submit(*run).result()
        except BrokenProcessPool:
            raise SlmopsError(
                f"the child process running {function.__name__} ended before it finished: it was killed (out of "
                f"memory?), or {UNGUARDED[0].lower()}{UNGUARDED[1:]}"
            ) from None
        except BaseException:  # SIGTERM or Ctrl-C: the child stops too (the pool would wait for it to finish)
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()
            raise


def _socket_folder() -> None:
    """Before the fork server starts: the folder multiprocessing keeps for its socket in the system's temporary
    folder. multiprocessing makes it once, where tempfile points then, and a library may have pointed tempfile into
    a work folder of its own (Olive's run(tempdir=) does) that is removed, the server's socket with it."""
    import tempfile
    from multiprocessing import process, util

    config = process.current_process()._config
    saved, tempfile.tempdir = tempfile.tempdir, None  # None: TMPDIR or the system's
    try:
        made = config.get("tempdir")
        if made and (not os.path.isdir(made) or os.path.dirname(made) != tempfile.gettempdir()):
            del config["tempdir"]
        util.get_temp_dir()
    finally:
        tempfile.tempdir = saved


def _in_environment(environment: dict[str, str], function: Callable[..., Any], *args: Any) -> Any:
    """In a child of the fork server, which has the environment slmops had when it started the server: the
    environment of the call (SLMOPS_HOME, thread settings) first."""
    os.environ.clear()
    os.environ.update(environment)
    return function(*args)


def release() -> None:
    """End the fork server (its imports' memory back to the system) when no more torch steps are coming; the next
    warm step starts a new one."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None and getattr(forkserver._forkserver, "_forkserver_pid", None) is not None:
        stop()
