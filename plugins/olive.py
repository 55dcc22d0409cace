"""Converter: Microsoft Olive's ModelBuilder pass, through Olive's Python API (olive.run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmops.api import ConvertRequest, extra_problem, hookimpl, run_olive
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

    def check(self, request: ConvertRequest, architecture: str) -> str | None:
        return extra_problem("olive", "the Olive converter") or super().check(request, architecture)

    def convert(self, request: ConvertRequest, output_dir: Path, work_dir: Path) -> None:
        olive_out = work_dir / "olive-output"
        fit_olive_to_the_builder()
        run_olive(olive_workflow(request, olive_out, work_dir), work_dir)
        move_model_files(olive_out, output_dir)


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
