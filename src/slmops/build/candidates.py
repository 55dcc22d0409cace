"""The builds worth comparing for one source: deploy --precision auto tries them in order, bench --compare measures
them all."""

from __future__ import annotations

from typing import Any

# The builds worth comparing, about smallest first: deploy --precision auto tries them in this order, bench --compare
# measures them all. "int4 gguf" is a GGUF source's own blocks (exact weights); other sources skip it. "int4 gptq" is
# the int4 of a float source (error-compensating rounding, Q4_0 to Q8_0 blocks within llama.cpp Q4_K_M's bytes: a
# fraction of imatrix's KLD), then the same within Q5_K_M's bytes (still well under int8's); a GGUF source that passes
# with its own blocks stops before them. imatrix and the RTN builds stay for sources gptq cannot take (docs/architecture.md, "The measurements behind the constants").
CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    ("int4 gguf", {"precision": "int4", "algorithm": "gguf"}),
    ("int4 gptq", {"precision": "int4", "algorithm": "gptq", "block_size": 32}),
    (
        "int4 gptq, Q5_K_M bytes",
        {"precision": "int4", "algorithm": "gptq", "block_size": 32, "plugin_options": {"gptq": {"budget": "Q5_K_M"}}},
    ),
    ("int4 imatrix", {"precision": "int4", "algorithm": "imatrix", "symmetric": False, "block_size": 32}),
    ("int4 rtn_last asym", {"precision": "int4", "algorithm": "rtn_last", "symmetric": False, "block_size": 32}),
    ("int4 rtn sym", {"precision": "int4", "algorithm": "rtn", "symmetric": True, "block_size": 32}),
    ("int4 rtn sym block 16", {"precision": "int4", "algorithm": "rtn", "symmetric": True, "block_size": 16}),
    ("int8", {"precision": "int8", "symmetric": True, "block_size": 32}),
    ("fp32", {"precision": "fp32"}),
]


def candidate_options(base: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """A candidate's options over the user's, except the plugin options the user gave, which stay theirs."""
    merged = {**base, **candidate}
    given = base.get("plugin_options") or {}
    plugins = {**candidate.get("plugin_options", {})}
    for name, values in given.items():
        plugins[name] = {**plugins.get(name, {}), **values}
    if plugins:
        merged["plugin_options"] = plugins
    return merged
