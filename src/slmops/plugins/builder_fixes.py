"""Fixes applied to the ONNX Runtime GenAI model builder before it runs, for configs it misreads on transformers 5.
Imported by the builder's child process (model-builder) and by the Olive converter, so it imports nothing heavy."""

from __future__ import annotations

from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention")


def flatten_layer_rope(config: Any) -> None:
    """Gemma 3 on transformers 5 keeps RoPE per layer type ({"full_attention": {...}, "sliding_attention": {...}});
    the builder's Gemma3Model reads the transformers 4 names (rope_theta, rope_local_base_freq, rope_scaling) and
    fails, or without the fix would fall back to a theta of 10,000 on the global layers."""
    nested = getattr(config, "rope_parameters", None)
    if not (isinstance(nested, dict) and set(LAYER_TYPES) <= set(nested)):
        return
    config.rope_local_base_freq = nested["sliding_attention"]["rope_theta"]
    config.rope_parameters = dict(nested["full_attention"])


def fit_the_builder() -> None:
    """Patch the installed builder for the configs above (once per process)."""
    from onnxruntime_genai.models import builder

    gemma3 = builder.Gemma3Model  # the class the builder dispatches to (it imports its builders as a top-level package)
    init = gemma3.__init__
    if getattr(init, "slmops_fixed", False):
        return

    def gemma3_init(self, config, *args, **kwargs):
        if getattr(config, "model_type", "") in ("gemma3", "gemma3_text"):  # not Gemma 4, which reads the nesting
            flatten_layer_rope(config)
        init(self, config, *args, **kwargs)

    gemma3_init.slmops_fixed = True
    gemma3.__init__ = gemma3_init

    smollm3 = builder.SmolLM3Model
    make_attention = smollm3.make_attention

    def smollm3_make_attention(self, layer_id, attention, root_input, **kwargs):
        # SmolLM3's no_rope_layers[i] == 0 means no RoPE in layer i; the builder (0.18) reads it as "RoPE outside the
        # attention op" and fails looking for a position_ids input. Switch RoPE off for those layers instead.
        rope = self.attention_attrs["rope"]
        self.attention_attrs["rope"] = rope and bool(self.no_rope_layers[layer_id])
        try:
            make_attention(self, layer_id, attention, root_input, **kwargs)
        finally:
            self.attention_attrs["rope"] = rope

    smollm3.make_attention = smollm3_make_attention


def option_text(options: dict[str, Any]) -> list[str]:
    """Options as the builder's CLI takes them: KEY=VALUE, booleans lower-case, and the int4_ names (Olive 0.13's
    pass keys, and the builder's before 0.15) under the names 0.18 reads: it ignores int4_block_size and the rest
    without a word, and builds block 32, symmetric."""
    text = []
    for key, value in options.items():
        value = str(value).lower() if isinstance(value, bool) else value
        text.append(f"{key.removeprefix('int4_')}={value}")
    return text
