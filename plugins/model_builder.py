"""Converter: the ONNX Runtime GenAI model builder, called in-process (the fast path)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from slmops import hookimpl
from slmops.builder_options import BuilderConverter, builder_options
from slmops.roles import ConvertRequest


class ModelBuilderConverter(BuilderConverter):
    name = "model-builder"
    description = "onnxruntime_genai.models.builder.create_model, in-process"
    cost = 10

    def convert(self, request: ConvertRequest, output_dir: Path, work_dir: Path) -> None:
        from onnxruntime_genai.models.builder import create_model

        # The builder prints a lot; keep it for --debug-level logs, not the user's terminal.
        with contextlib.redirect_stdout(io.StringIO()):
            create_model(
                model_name=str(request.source_dir),
                input_path=str(request.source_dir),
                output_dir=str(output_dir),
                precision=request.precision,
                execution_provider=request.device,
                cache_dir=str(work_dir),
                **builder_options(request),
            )


@hookimpl
def register_converters(register):
    register(ModelBuilderConverter())
