"""Converter: the ONNX Runtime GenAI model builder, called directly (the fast path)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from slmops.api import ConvertRequest, SlmopsError, hookimpl, in_child
from slmops.plugins.builder_options import BuilderConverter, builder_options

# The build runs in a child process (forked from slmops's warm fork server, which has the builder imported), so
# its peak memory is the builder's, and everything it allocated (the torch model) goes back to the OS when it ends.
# It prints a lot, and its libraries warn about their own deprecations: neither is the user's business, so its
# output goes to a log file whose last line names what failed.


def _build(arguments: dict[str, str], options: dict[str, Any], log: str) -> None:
    """In the child: builder.create_model as the builder's own CLI calls it, with slmops's small fixes."""
    import warnings

    from onnxruntime_genai.models import builder

    from slmops.plugins.builder_fixes import fit_the_builder, option_text

    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)  # the C++ parts write to the descriptors, not to sys.stdout
        os.dup2(out.fileno(), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fit_the_builder()
        options = builder.parse_extra_options(*arguments.values(), option_text(options))
        try:
            builder.create_model(**arguments, **options)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


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
        log = work_dir / "model-builder.log"
        try:
            in_child(_build, arguments, builder_options(request), str(log), warm=True)
        except SlmopsError:  # the child was killed (out of memory?): its log's last line would not say why
            raise
        except Exception as e:
            text = log.read_text(errors="replace") if log.is_file() else ""
            lines = [line for line in text.splitlines() if line.strip()] or [f"{type(e).__name__}: {e}"]
            if any("No space left on device" in line or "Errno 28" in line for line in lines):
                raise SlmopsError(
                    f"the disk filled up while the model builder wrote {output_dir}; free space (or set SLMOPS_HOME "
                    "to a folder on a larger disk) and convert again"
                ) from None
            raise SlmopsError(
                f"the model builder could not build {request.source_dir}: "
                f"{lines[-1]}; the installed onnxruntime-genai does not handle this model's config (see `slmops "
                "doctor` for the versions)"
            ) from None


@hookimpl
def register_converters(register):
    register(ModelBuilderConverter())
