"""Quantizer: ONNX Runtime's MatMulNBitsQuantizer on an fp32 ONNX GenAI model (int8, or int4 by RTN or HQQ)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

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
        share_tied_embedding(quantizer.model.model)
        quantizer.model.save_model_to_file(str(output_dir / "model.onnx"), use_external_data_format=True)
        copy_tree(fp32_dir, output_dir, skip=MODEL_FILES)  # genai_config.json, tokenizer, chat template, adapters/


def share_tied_embedding(model) -> bool:
    """A tied embedding (the fp32 graph gathers from Transpose(lm_head weight)) reads the quantized lm_head's blocks
    once the lm_head is MatMulNBits (GatherBlockQuantized, as the model builder's own int4 does), instead of keeping
    the float table for the Gather alone: SmolLM2's is 113 MB, more than the rest of its int4 base. True if it did."""
    import onnx
    from onnx import helper, numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    quantized = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMulNBits"}  # its blocks' name -> node
    for gather in model.graph.node:
        transpose = producers.get(gather.input[0]) if gather.op_type == "Gather" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
            continue
        weight = transpose.input[0]
        matmul = next((m for b, m in quantized.items() if b.startswith(f"{weight}_Q")), None)
        zero_points = matmul.input[3:4] if matmul is not None else []
        if matmul is None or (zero_points and inits[zero_points[0]].data_type != onnx.TensorProto.UINT8):
            continue  # HQQ's float zero points: GatherBlockQuantized takes integer ones only
        attrs = {a.name: helper.get_attribute_value(a) for a in matmul.attribute}
        blocks = inits[matmul.input[1]]  # [N, K / block, block * bits / 8]: a row of codes per vocabulary entry
        shape = numpy_helper.from_array(np.array([blocks.dims[0], -1], dtype=np.int64), f"{weight}_table_shape")
        model.graph.initializer.append(shape)
        table = helper.make_node("Reshape", [matmul.input[1], shape.name], [f"{weight}_table"], name=f"{weight}_table")
        inputs = [table.output[0], gather.input[1], matmul.input[2], *zero_points]
        embed = helper.make_node(
            "GatherBlockQuantized",
            inputs,
            list(gather.output),
            name=f"{gather.name}_quantized",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=attrs["block_size"],
            bits=attrs["bits"],
        )
        nodes = [n for n in model.graph.node if n is not gather and n is not transpose]
        model.graph.ClearField("node")
        model.graph.node.extend([table, embed, *nodes])  # first: they read only initializers and input_ids
        if not any(weight in n.input for n in model.graph.node):  # the float table: nothing else reads it
            kept = [i for i in model.graph.initializer if i.name != weight]
            model.graph.ClearField("initializer")
            model.graph.initializer.extend(kept)
        return True
    return False


@hookimpl
def register_quantizers(register):
    register(MatMulNBits())
