"""Prompt templates, one job a module: detection (which family a model speaks), rendering (prompts as text),
checking (slmops's rendering against the model's own chat template, text and tokens), safety (control tokens in user
text) and inference_file (the guide's inference_model.json). The names below are the ones the rest of slmops uses."""

from slmops.templates.checking import count_tokens, fidelity
from slmops.templates.detection import (
    ADD_FAMILY_HINT,
    ChosenTemplate,
    choose,
    derive_family,
    detect,
    family_by_name,
    read_model_info,
)
from slmops.templates.inference_file import family_from_inference_model, inference_model
from slmops.templates.rendering import (
    CONVERSATIONS,
    Messages,
    chat_template,
    render,
    runtime_render,
    takes_tools,
    tokenizer_render,
    write_chat_template,
)
from slmops.templates.safety import control_tokens, neutralize

__all__ = [
    "ADD_FAMILY_HINT",
    "CONVERSATIONS",
    "ChosenTemplate",
    "Messages",
    "chat_template",
    "choose",
    "control_tokens",
    "count_tokens",
    "derive_family",
    "detect",
    "family_by_name",
    "family_from_inference_model",
    "fidelity",
    "inference_model",
    "neutralize",
    "read_model_info",
    "render",
    "runtime_render",
    "takes_tools",
    "tokenizer_render",
    "write_chat_template",
]
