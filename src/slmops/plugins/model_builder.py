"""Converter: the ONNX Runtime GenAI model builder, called directly (the fast path)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from slmops.api import ConvertRequest, SlmopsError, die_with_parent, hookimpl
from slmops.plugins.builder_options import BuilderConverter, builder_options

# The build runs in a child process that imports what the builder's own CLI imports (and slmops's small fixes), so its
# peak memory is the builder's, and everything it allocated (the torch model) goes back to the OS when it exits.
# It prints a lot, and its libraries warn about their own deprecations: neither is the user's business.
CHILD = """\
import contextlib, json, sys, warnings
from onnxruntime_genai.models import builder
from slmops.plugins.builder_fixes import fit_the_builder, option_text
arguments, options = json.loads(sys.argv[1])
with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    fit_the_builder()
    options = builder.parse_extra_options(*arguments.values(), option_text(options))  # as the builder's CLI does
    builder.create_model(**arguments, **options)
"""


class ModelBuilderConverter(BuilderConverter):
    name = "model-builder"
    description = "onnxruntime_genai.models.builder.create_model, in a child process"
    cost = 10

    def convert(self, request: ConvertRequest, output_dir: Path, work_dir: Path) -> None:
        arguments = dict(
            model_name=str(request.source_dir),
            input_path=str(request.source_dir),
            output_dir=str(output_dir),
            precision=request.precision,
            execution_provider=request.device,
            cache_dir=str(work_dir),
        )
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps([arguments, builder_options(request)])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            preexec_fn=functools.partial(die_with_parent, os.getpid()) if os.name == "posix" else None,
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            if any("No space left on device" in line or "Errno 28" in line for line in lines):
                raise SlmopsError(
                    f"the disk filled up while the model builder wrote {output_dir}; free space (or set SLMOPS_HOME "
                    "to a folder on a larger disk) and convert again"
                )
            raise SlmopsError(
                f"the model builder could not build {request.source_dir}: "
                f"{lines[-1] if lines else f'exit status {done.returncode}'}; the installed onnxruntime-genai "
                "does not handle this model's config (see `slmops doctor` for the versions; --log-level info shows the builder's log)"
            )


@hookimpl
def register_converters(register):
    register(ModelBuilderConverter())
