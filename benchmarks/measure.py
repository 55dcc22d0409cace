"""Run a command and measure its wall time and peak RSS, as GNU time does: a wrapper process waits for the
command and reads getrusage(RUSAGE_CHILDREN).ru_maxrss, which covers every descendant that was waited for
(polling the process tree missed the worker Olive starts)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=sys.stderr)\n"
    "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child must never block on a full pipe
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, stderr=log, env=env, cwd=cwd, text=True
    )
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        log.seek(0)
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {log.read().decode(errors='replace')[-500:]}")
    return {"wall_s": wall, "peak_rss_mb": result["maxrss_kb"] / 1000}
