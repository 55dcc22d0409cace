"""Every supported architecture converts at fp32, int8 and int4 and generates, and its fp32 build is its source:
tiny random-weight models whose configs carry each family's real quirks (LongRoPE, partial rotary, sliding windows,
transformers-5 rope_parameters, tied and untied embeddings, several eos ids, no-RoPE layers), checked by convert's
own comparison with the source in torch."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slmops.build import convert
from slmops.build.verify import FP32_MAX_KLD
from slmops.doctor import TESTED_ARCHITECTURES

pytestmark = pytest.mark.slow
LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)], "long_factor": [2.0] * 8}

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "granite": "GraniteForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
# family -> (model_type, what its real config.json says that matters)
FAMILIES = {
    "llama3.2": ("llama", dict(tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0, eos_token_id=[2, 0])),
    "qwen2.5": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=True, rope_theta=1000000.0)),
    "phi3-mini-4k": ("phi3", dict(original_max_position_embeddings=256)),
    # LongRoPE: past original_max_position_embeddings the long factors apply (the check runs 192 positions).
    "phi3.5-mini": ("phi3", dict(original_max_position_embeddings=128, rope_scaling=LONGROPE)),
    "phi4-mini": ("phi3", dict(hidden_size=256, partial_rotary_factor=0.75, tie_word_embeddings=True,
        original_max_position_embeddings=128, rope_scaling={**LONGROPE, "short_factor": [1.0] * 24,
        "long_factor": [1.5] * 24})),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=16, tie_word_embeddings=True,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16)),
    # transformers 5 nests RoPE per layer type; the builder reads the 4.x names (slmops fixes that before it runs)
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=16, sliding_window_pattern=2, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, tie_word_embeddings=True, query_pre_attn_scalar=16)),
    "mistral": ("mistral", dict(sliding_window=None, rope_theta=1000000.0)),
    "granite3": ("granite", dict(embedding_multiplier=12.0, attention_multiplier=0.1, residual_multiplier=0.2,
        logits_scaling=8.0, tie_word_embeddings=True)),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0], pad_token_id=None, tie_word_embeddings=True)),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_of(tmp_path_factory, default_checkpoint):
    """A tiny random-weight model of a family, with the default model's tokenizer; built once per family."""
    made = {}

    def make(family: str):
        if family not in made:
            model_type, quirks = FAMILIES[family]
            tok = AutoTokenizer.from_pretrained(default_checkpoint)
            config = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)  # fmt: skip
            import torch  # in the test: a suite run with only the core skips what needs slmops[torch]

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**config, **quirks}))
            out = tmp_path_factory.mktemp("arch") / family
            model.save_pretrained(out)
            tok.save_pretrained(out)
            made[family] = out
        return made[family]

    return make


def test_every_listed_architecture_is_tested_here():
    assert {ARCHITECTURES[model_type] for model_type, _ in FAMILIES.values()} == set(TESTED_ARCHITECTURES)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_build_is_its_source(family, tiny_of):
    built = convert.convert(str(tiny_of(family)), {"precision": "fp32"})
    found = built.verification["source"]
    assert built.manifest["source"]["architecture"] == ARCHITECTURES[FAMILIES[family][0]]
    assert found["positions"] == 192
    assert found["mean_kld"] <= FP32_MAX_KLD and found["top1_agreement"] == 1.0, found
    assert built.verification["sample"]["tokens"] > 0


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_build_generates_and_records_its_distance(family, precision, tiny_of):
    built = convert.convert(str(tiny_of(family)), {"precision": precision})
    found = built.verification["source"]
    assert built.verification["sample"]["tokens"] > 0
    assert found["positions"] == 192 and found["mean_kld"] < 1.0, found  # close
    # and quantized: int8 (Q8_0 blocks) of a tiny Granite, whose logits are scaled down, is within float noise of it
    ops = built.verification["graph"]["ops"]
    assert ops.get("MatMulNBits", 0) + ops.get("MatMulGGML", 0) > 0, ops
    assert not built.verification["graph"]["float_matmuls"] or precision == "int4", built.verification["graph"]
