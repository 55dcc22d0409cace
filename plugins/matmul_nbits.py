"""Quantizer: ONNX Runtime's MatMulNBitsQuantizer on an fp32 ONNX GenAI model (int8, or int4 by RTN or HQQ)."""

from __future__ import annotations

import warnings
from pathlib import Path

from slmops.api import MODEL_FILES, ConvertRequest, Quantizer, copy_tree, hookimpl, runtime_fed_matmuls


class MatMulNBits(Quantizer):
    name = "matmul-nbits"
    description = "onnxruntime.quantization MatMulNBitsQuantizer: 8 or 4 bits block-wise RTN, or 4-bit HQQ"
    precisions = ("int8", "int4")
    algorithms = ("rtn", "hqq")

    def check(self, request: ConvertRequest) -> str | None:
        if request.precision == "int4" and request.algorithm not in ("rtn", "hqq"):
            return "offers int4 by rtn or hqq only"
        if request.algorithm == "hqq" and request.precision != "int4":
            return "hqq quantizes to int4 only"
        if request.algorithm == "hqq" and request.symmetric:
            return "hqq fits a zero point per block: add --asymmetric"
        return super().check(request)

    def quantize(self, fp32_dir: Path, output_dir: Path, request: ConvertRequest) -> None:
        import logging

        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb

        logging.getLogger(mnb.__name__).setLevel(logging.WARNING)  # it logs INFO per node

        model = onnx.load(str(fp32_dir / "model.onnx"))
        algo_config = None
        if request.algorithm == "hqq":
            # Half-quadratic quantization (what Olive offers as its OnnxHqqQuantization pass): fits scales and
            # float zero points per block without data. Olive 0.13's own pass renamed the logits output and gave
            # a model that answers noise on SmolLM2; ONNX Runtime's implementation is used instead.
            algo_config = mnb.HQQWeightOnlyQuantConfig(block_size=request.block_size, bits=4)
        quantizer = mnb.MatMulNBitsQuantizer(
            model,
            bits=8 if request.precision == "int8" else 4,
            block_size=request.block_size,
            is_symmetric=request.symmetric,
            accuracy_level=request.accuracy_level or None,
            nodes_to_exclude=runtime_fed_matmuls(model),  # LoRA weights switched at run time stay float
            algo_config=algo_config,
        )
        with warnings.catch_warnings():  # HQQ's torch.from_numpy on read-only weights warns; it only reads them
            warnings.simplefilter("ignore", UserWarning)
            quantizer.process()
        if request.accuracy_level and algo_config is not None:  # the HQQ path leaves the attribute out
            for node in quantizer.model.model.graph.node:
                if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                    node.attribute.append(onnx.helper.make_attribute("accuracy_level", request.accuracy_level))
        quantizer.model.save_model_to_file(str(output_dir / "model.onnx"), use_external_data_format=True)
        copy_tree(fp32_dir, output_dir, skip=MODEL_FILES)  # genai_config.json, tokenizer, chat template, adapters/


@hookimpl
def register_quantizers(register):
    register(MatMulNBits())
