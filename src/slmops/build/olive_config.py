"""Read the deployment guide's Olive workflow JSON (Method 2) and apply what it means.

Olive 0.13 silently ignores ``quantization_config`` in a ModelBuilder pass; slmops maps it to the
builder's int4 options, and refuses any other key it would ignore instead of losing it in a log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmops.config import Config
from slmops.errors import SlmopsError
from slmops.host.reading import read_text_limited

TOP_KEYS = {
    "input_model",
    "systems",
    "passes",
    "host",
    "target",
    "cache_dir",
    "output_dir",
    "engine",
    "log_severity_level",
}
INPUT_KEYS = {"type", "model_path", "task", "adapter_path"}
PASS_KEYS = {
    "precision",
    "quantization_config",
    "int4_block_size",
    "int4_is_symmetric",
    "int4_accuracy_level",
    "int4_algo_config",
}
QUANT_KEYS = {"block_size": "block_size", "is_symmetric": "symmetric", "accuracy_level": "accuracy_level"}
ALGO = {
    "default": "rtn",
    "rtn": "rtn",
    "rtn_last": "rtn_last",
    "k_quant": "k_quant",
    "k_quant_mixed": "k_quant_mixed",
    "k_quant_last": "k_quant_last",
}


def _unknown(where: str, keys: set[str], known: set[str], path: Path) -> None:
    extra = sorted(keys - known)
    if extra:
        raise SlmopsError(
            f"{path}: {where} key {extra[0]!r} is not supported (Olive would ignore it); known: {', '.join(sorted(known))}"
        )


def _object(value: Any, where: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SlmopsError(f"{path}: {where} must be a JSON object, not {type(value).__name__} {value!r}")
    return value


def read_olive_config(path: Path) -> tuple[str, dict[str, Any], str | None]:
    """(source, convert options, output dir) from an Olive workflow file."""
    if not path.exists():
        raise SlmopsError(f"config file {path} not found")
    try:
        data = json.loads(read_text_limited(path, "Olive workflow JSON", limit=1 << 20))
    except ValueError as e:
        raise SlmopsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SlmopsError(f"{path}: expected a JSON object (an Olive workflow)")
    _unknown("top-level", set(data), TOP_KEYS, path)
    model = _object(data.get("input_model"), "input_model", path)
    _unknown("input_model", set(model), INPUT_KEYS, path)
    if (
        model.get("type", "HfModel") != "HfModel"
        or not isinstance(model.get("model_path"), str)
        or not model["model_path"]
    ):
        raise SlmopsError(f"{path}: input_model must be an HfModel with a model_path")
    passes = _object(data.get("passes"), "passes", path)
    builders = [p for p in passes.values() if isinstance(p, dict) and p.get("type") == "ModelBuilder"]
    if len(passes) != 1 or len(builders) != 1:
        raise SlmopsError(
            f"{path}: slmops runs workflows with exactly one ModelBuilder pass; found {sorted(passes) or 'none'}"
        )
    # Olive reads a pass's options from its "config" object or, in the flat form, beside "type" (as Olive does)
    flat = {k: v for k, v in builders[0].items() if k not in ("type", "config")}
    if flat and "config" in builders[0]:
        raise SlmopsError(
            f'{path}: the ModelBuilder pass has options both in "config" and beside "type" '
            f"({', '.join(sorted(flat))}); keep one form"
        )
    config = _object(builders[0].get("config", flat), "the ModelBuilder pass's config", path)
    _unknown("ModelBuilder config", set(config), PASS_KEYS, path)
    options: dict[str, Any] = {}
    if "precision" in config:
        options["precision"] = str(config["precision"]).lower()
    quant = _object(config.get("quantization_config"), "quantization_config", path)
    _unknown("quantization_config", set(quant), set(QUANT_KEYS), path)
    for key, ours in QUANT_KEYS.items():
        if key in quant:
            options[ours] = quant[key]
    for key, ours in (
        ("int4_block_size", "block_size"),
        ("int4_is_symmetric", "symmetric"),
        ("int4_accuracy_level", "accuracy_level"),
    ):
        if key in config:
            options[ours] = config[key]
    if "int4_algo_config" in config:
        if config["int4_algo_config"] not in ALGO:
            raise SlmopsError(
                f"{path}: int4_algo_config {config['int4_algo_config']!r} is not supported; use one of {', '.join(ALGO)}"
            )
        options["algorithm"] = ALGO[config["int4_algo_config"]]
    for system in _object(data.get("systems"), "systems", path).values():
        for acc in _object(system, "a system", path).get("accelerators") or []:
            acc = _object(acc, "an accelerator", path)
            providers = acc.get("execution_providers") or []
            if providers and providers != ["CPUExecutionProvider"]:
                raise SlmopsError(
                    f"{path}: execution provider {providers[0]} is not supported here; use CPUExecutionProvider"
                )
    if model.get("adapter_path"):
        options["adapter"] = model["adapter_path"]
    base = path.parent
    source = (
        str((base / model["model_path"]).resolve())
        if not Path(model["model_path"]).is_absolute()
        else model["model_path"]
    )
    out = data.get("output_dir")
    if out is not None and not isinstance(out, str):
        raise SlmopsError(f"{path}: output_dir must be a folder name, not {type(out).__name__} {out!r}")
    if model.get("adapter_path") is not None and not isinstance(model["adapter_path"], str):
        raise SlmopsError(f"{path}: input_model.adapter_path must be a folder name")
    return source, options, (str((base / out).resolve()) if out and not Path(out).is_absolute() else out)


def apply_to(cfg: Config, path: Path) -> None:
    """Take the workflow's source, options and output into the settings, each marked as coming from the file; an
    output given on the command line wins."""
    source, options, output = read_olive_config(path)
    cfg.override("model.source", source, str(path))
    for key, value in options.items():
        cfg.override(f"{'model' if key == 'adapter' else 'convert'}.{key}", value, str(path))
    if output and not cfg.get("convert.output"):
        cfg.override("convert.output", output, str(path))
