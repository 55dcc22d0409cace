"""Quantizer: ONNX Runtime's MatMulNBitsQuantizer on an fp32 ONNX GenAI model (int8, or int4)."""

from __future__ import annotations

import shutil
from pathlib import Path

from slmops import hookimpl
from slmops.roles import ConvertRequest, Quantizer

MODEL_FILES = {"model.onnx", "model.onnx.data"}


class MatMulNBits(Quantizer):
    name = "matmul-nbits"
    description = "onnxruntime.quantization MatMulNBitsQuantizer, 8 or 4 bits, block-wise"
    precisions = ("int8", "int4")

    def check(self, request: ConvertRequest) -> str | None:
        if request.precision == "int4" and request.algorithm != "rtn":
            return "offers RTN only"
        return super().check(request)

    def quantize(self, fp32_dir: Path, output_dir: Path, request: ConvertRequest) -> None:
        import logging

        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # it logs INFO per run

        model = onnx.load(str(fp32_dir / "model.onnx"))
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=8 if request.precision == "int8" else 4,
            block_size=request.block_size,
            is_symmetric=request.symmetric,
            accuracy_level=request.accuracy_level or None,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(output_dir / "model.onnx"), use_external_data_format=True)
        for item in fp32_dir.iterdir():  # genai_config.json, tokenizer files, chat template
            if item.name not in MODEL_FILES and item.is_file():
                shutil.copy2(item, output_dir / item.name)


@hookimpl
def register_quantizers(register):
    register(MatMulNBits())
