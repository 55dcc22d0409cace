"""What a ConvertRequest means to the ONNX Runtime GenAI model builder (shared by every plugin that calls it)."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Any

from slmops.api import Converter, ConvertRequest

# slmops's algorithm names -> the builder's int4_algo_config ("rtn" is the builder's default RTN path)
INT4_ALGORITHMS = {
    "rtn": None,
    "rtn_last": "rtn_last",
    "k_quant": "k_quant",
    "k_quant_mixed": "k_quant_mixed",
    "k_quant_last": "k_quant_last",
}


def builder_options(request: ConvertRequest) -> dict[str, Any]:
    """The builder's extra options for a request. Remote code runs only when the user asked for it."""
    options: dict[str, Any] = {"hf_remote": bool(request.trust_remote_code), "hf_token": "false"}
    if request.precision == "int4":
        options["int4_block_size"] = request.block_size
        options["int4_is_symmetric"] = request.symmetric
        if request.accuracy_level:
            options["int4_accuracy_level"] = request.accuracy_level
        algo = INT4_ALGORITHMS[request.algorithm]
        if algo:
            options["int4_algo_config"] = algo
    if request.keeps_adapter:
        options["adapter_path"] = str(request.adapter)  # LoRA branches kept apart from the base weights
    return options


@functools.cache
def builder_architectures() -> tuple[str, ...]:
    """The architectures the installed model builder knows, read from its own dispatch."""
    # Read the file instead of importing it: importing the builder pulls in torch (seconds).
    spec = importlib.util.find_spec("onnxruntime_genai")
    text = (Path(spec.origin).parent / "models" / "builder.py").read_text()
    return tuple(sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+)"', text))))


class BuilderConverter(Converter):
    """What converters built on the ORT GenAI model builder share: its precisions, algorithms, architectures."""

    precisions = ("fp32", "fp16", "int4")
    algorithms = tuple(INT4_ALGORITHMS)

    def check(self, request: ConvertRequest, architecture: str) -> str | None:
        if architecture not in builder_architectures():
            return f"the model builder does not know {architecture}"
        return super().check(request, architecture)

    def supported_architectures(self) -> tuple[str, ...]:
        return builder_architectures()
