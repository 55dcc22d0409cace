"""Microsoft Olive in slmops, through Olive's Python API (olive.run), run quietly: the converter (Olive's ModelBuilder
pass), and a LoRA kept apart as an ORT GenAI adapter file (Olive's ExtractAdapters pass)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

from slmops.api import ConvertRequest, extra_problem, hookimpl, need_extra
from slmops.plugins.builder_fixes import fit_the_builder, option_text
from slmops.plugins.builder_options import BuilderConverter, builder_options

# Keys of Olive 0.13's ModelBuilder pass that slmops's request maps to; anything else Olive ignores.
PASS_KEYS = ("int4_block_size", "int4_is_symmetric", "int4_accuracy_level", "int4_algo_config")


def olive_workflow(request: ConvertRequest, output_dir: Path, work_dir: Path) -> dict[str, Any]:
    """The Olive workflow (the guide's Method 2 file, with what the request means spelled out)."""
    options = builder_options(request)
    pass_config: dict[str, Any] = {"precision": request.precision}
    pass_config.update({k: options.pop(k) for k in PASS_KEYS if k in options})
    pass_config["extra_options"] = options
    input_model: dict[str, Any] = {
        "type": "HfModel",
        "model_path": str(request.source_dir),
        "task": "text-generation",
        "load_kwargs": {"trust_remote_code": request.trust_remote_code},
    }
    return {
        "input_model": input_model,
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": request.device, "execution_providers": [request.provider]}],
            }
        },
        "passes": {"builder": {"type": "ModelBuilder", "config": pass_config}},
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(work_dir / "olive-cache"),
        "output_dir": str(output_dir),
    }


class OliveConverter(BuilderConverter):
    name = "olive"
    description = "Olive ModelBuilder pass via olive.run (Python API)"
    cost = 50  # same graph as the builder, plus Olive's workflow overhead
    extracts_adapters = True

    def check(self, request: ConvertRequest, architecture: str) -> str | None:
        return extra_problem("olive", "the Olive converter") or super().check(request, architecture)

    def convert(self, request: ConvertRequest, output_dir: Path, work_dir: Path) -> None:
        olive_out = work_dir / "olive-output"
        fit_olive_to_the_builder()
        run_workflow(olive_workflow(request, olive_out, work_dir), work_dir)
        move_model_files(olive_out, output_dir)

    def extract_adapter(self, unmerged_dir: Path, output_dir: Path, work_dir: Path) -> Path:
        need_extra("olive", "keeping a LoRA adapter apart (Olive's ExtractAdapters pass)")
        workflow: dict[str, Any] = {
            "input_model": {"type": "ONNXModel", "model_path": str(unmerged_dir), "onnx_file_name": "model.onnx"},
            "passes": {
                "extract": {
                    "type": "ExtractAdapters",
                    "make_inputs": True,
                    "dynamic_lora_r": True,
                    "optional_inputs": True,
                    "save_format": "onnx_adapter",
                    # weights beside the graph, as the builder writes them (protobuf stops at 2 GB)
                    "save_as_external_data": True,
                    "external_data_name": "model.onnx.data",
                }
            },
            "cache_dir": str(work_dir / "olive-cache"),
            "output_dir": str(output_dir),
        }
        run_workflow(workflow, work_dir)
        return output_dir / "adapter_weights.onnx_adapter"


def run_workflow(workflow: dict[str, Any], work_dir: Path) -> Any:
    """Run an Olive workflow (the dict an Olive JSON config holds), quietly: slmops reports steps and errors."""
    import olive
    from olive.logging import get_olive_logger

    # Olive logs to stdout (which must stay clean for --json) and raises itself to INFO to print its run history,
    # whatever the workflow's log_severity_level says; a level on its handlers holds.
    for handler in get_olive_logger().handlers:
        handler.setLevel(logging.ERROR)
    workflow = {"log_severity_level": 3, **workflow}
    # olive.run(tempdir=) points the process's tempfile at work_dir and leaves it there: put back after, or whatever
    # made a temporary folder later (multiprocessing's, for its fork server's socket) made it in a folder about to go
    saved = tempfile.tempdir
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # passes print (the model builder does)
            return olive.run(workflow, tempdir=str(work_dir))
    finally:
        tempfile.tempdir = saved


def fit_olive_to_the_builder() -> None:
    """Olive 0.13's ModelBuilder pass was written for onnxruntime-genai 0.14; on 0.15+ (which slmops needs for Gemma 3
    and LongRoPE Phi) it fails twice. It calls create_model with raw options, which 0.15+ wants parsed first
    (parse_extra_options, as the builder's CLI does): we parse them on its way in. And it patches
    onnxruntime_genai.models.quantized_model, gone in 0.18, for Olive-quantized (GPTQ/AWQ) inputs, which slmops never
    passes: that patch is skipped. Everything else, the workflow, the pass and the build, is Olive's own."""
    from olive.passes.onnx.model_builder import ModelBuilder
    from onnxruntime_genai.models import builder

    fit_the_builder()
    create = builder.create_model
    if getattr(create, "slmops_parsed", False) or not hasattr(builder, "parse_extra_options"):
        return

    def create_model(model_name, input_path, output_dir, precision, execution_provider, cache_dir, **options):
        precision = getattr(precision, "value", precision)  # Olive passes its Precision enum
        fixed = (model_name, input_path, output_dir, precision, execution_provider, cache_dir)
        if "hf_details" not in options:
            options = builder.parse_extra_options(*fixed, option_text(options))
        return create(*fixed, **options)

    create_model.slmops_parsed = True
    builder.create_model = create_model
    ModelBuilder.maybe_patch_quant = staticmethod(lambda: None)


def move_model_files(olive_out: Path, output_dir: Path) -> None:
    """Olive nests the model (output_dir/model/ in 0.13); move the folder holding genai_config.json."""
    found = sorted(olive_out.rglob("genai_config.json"))
    if not found:
        raise RuntimeError(f"Olive finished without writing a model (no genai_config.json under {olive_out})")
    for item in found[0].parent.iterdir():
        item.rename(output_dir / item.name)


@hookimpl
def register_converters(register):
    register(OliveConverter())
