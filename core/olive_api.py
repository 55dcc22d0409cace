"""Run an Olive workflow through its Python API, quietly: slmops reports steps and errors itself."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any


def run(workflow: dict[str, Any], work_dir: Path) -> Any:
    import olive
    from olive.logging import get_olive_logger

    # Olive logs to stdout (which must stay clean for --json) and raises itself to INFO to print its run history,
    # whatever the workflow's log_severity_level says; a level on its handlers holds.
    for handler in get_olive_logger().handlers:
        handler.setLevel(logging.ERROR)
    workflow = {"log_severity_level": 3, **workflow}
    with contextlib.redirect_stdout(io.StringIO()):  # passes print (the model builder does)
        return olive.run(workflow, tempdir=str(work_dir))
