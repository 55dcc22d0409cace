"""slmops.toml: the pipeline's settings, their defaults, and where each effective value came from."""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError, UsageError
from slmops.host.machine import TARGETS
from slmops.host.reading import read_text_limited
from slmops.plugin.roles import BLOCK_SIZES

CONFIG_NAME = "slmops.toml"

# section -> key -> (default, type, help). The single source of truth for valid keys.
SCHEMA: dict[str, dict[str, tuple[Any, type, str]]] = {
    "model": {
        "source": ("default", str, "HF checkpoint folder, GGUF file, or 'default' (embedded SmolLM2-135M-Instruct)"),
        "name": ("smollm2-135m-instruct", str, "name the model is registered under"),
        "adapter": ("", str, "PEFT LoRA adapter folder to apply to the source"),
        "adapter_mode": (
            "merge",
            str,
            "merge the LoRA into the weights, or adapter: an ORT GenAI adapter file beside the base",
        ),
        "adapter_force": (False, bool, "apply an adapter made for another base model or architecture"),
        "family": ("auto", str, "prompt-template family, or 'auto' to detect"),
        "trust_remote_code": (False, bool, "allow the checkpoint's own Python code to run"),
    },
    "convert": {
        "precision": ("int4", str, "fp32, fp16, int8, int4, or auto (smallest that passes validation)"),
        "device": ("cpu", str, "target device"),
        "provider": ("CPUExecutionProvider", str, "ONNX Runtime execution provider"),
        "backend": ("auto", str, "converter plugin, or auto (the fastest that supports the request)"),
        "quantizer": ("auto", str, "quantizer plugin, or auto (the cheapest route that supports the request)"),
        "block_size": (32, int, "int4/int8 quantization block size: 16, 32, 64, 128 or 256"),
        "symmetric": (True, bool, "symmetric quantization (false: with zero points)"),
        "algorithm": (
            "auto",
            str,
            "int4 algorithm: auto (gguf for a GGUF source, gptq for a float one), gptq, gguf, imatrix, rtn, rtn_last, "
            "k_quant, k_quant_mixed, k_quant_last, hqq; int8: auto (q8_0 for a float source) or rtn",
        ),
        "calibration": (
            "",
            str,
            "JSONL file of your own text (rows with text, or prompt and expected) to calibrate on",
        ),
        "accuracy_level": (0, int, "MatMulNBits accuracy_level (0: the runtime's default, 1-4)"),
        "target": (
            "native",
            str,
            "native: this machine's fastest code (the GGUF kernel where it runs); portable: no native code; or a "
            "platform (linux-x86_64, linux-aarch64, macos-arm64, ...): native code where it is this machine's",
        ),
        "output": ("", str, "output folder (default: slmops's build cache)"),
    },
    "registry": {
        "backend": ("foundry-local", str, "registry plugin"),
        "cache_dir": (
            "",
            str,
            "location of the [registry] backend (default: $SLMOPS_REGISTRY_DIR, else its own default)",
        ),
        "version": ("1", str, "version recorded in inference_model.json"),
        "description": ("", str, "description recorded in inference_model.json"),
        "replace": (True, bool, "replace an existing entry of the same name"),
    },
    "validate": {
        "max_kld": (0.02, float, "highest mean KL divergence against the source accepted"),
        "min_top1": (0.93, float, "lowest top-1 agreement with the source accepted"),
        "soak_requests": (20, int, "requests in the memory-leak soak"),
        "max_leak_mb": (50.0, float, "largest RSS growth over the soak accepted, MB"),
        "max_structure_drop": (
            0.02,
            float,
            "largest drop of a domain set share (accuracy, valid structure, fields, tool calls) below the source's",
        ),
        "domain": (
            "",
            str,
            "JSONL domain set (prompt/expected rows, with a schema or tools where the answer is structured) that "
            "validate and deploy's gate score on the build and its source",
        ),
    },
    "bench": {
        "runs": (5, int, "measured runs per prompt length"),
        "warmup": (1, int, "warm-up runs"),
        "max_new_tokens": (32, int, "tokens generated per run"),
        "lengths": ([16, 64, 256], list, "prompt lengths (tokens) of the sweep"),
    },
}


def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: math.isfinite(v) and v >= low), f"a finite number >= {low}"


def _one_of(*choices: Any) -> tuple[Any, str]:
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


# section.key -> (check, what a good value is). Flags and slmops.toml values go through the same checks, before any
# work starts, so `max_new_tokens = 0` is a usage error rather than a native abort twenty minutes in.
VALUE_CHECKS: dict[str, tuple[Any, str]] = {
    "convert.block_size": _one_of(*BLOCK_SIZES),
    "convert.accuracy_level": _one_of(0, 1, 2, 3, 4),
    "convert.target": _one_of(*TARGETS),
    "model.adapter_mode": _one_of("merge", "adapter"),
    "validate.max_kld": _at_least(0),
    "validate.min_top1": ((lambda v: math.isfinite(v) and 0 <= v <= 1), "a number from 0 to 1"),
    "validate.soak_requests": _at_least(0),
    "validate.max_leak_mb": _at_least(0),
    "validate.max_structure_drop": ((lambda v: math.isfinite(v) and 0 <= v <= 1), "a number from 0 to 1"),
    "bench.runs": _at_least(1),
    "bench.warmup": _at_least(0),
    "bench.max_new_tokens": _at_least(2),
    "bench.lengths": (
        (lambda v: bool(v) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)),
        "a non-empty list of whole numbers >= 1, e.g. [16, 128, 512]",
    ),
}


@dataclass
class Config:
    values: dict[str, dict[str, Any]]
    origin: dict[str, str] = field(default_factory=dict)  # "section.key" -> where it came from
    path: Path | None = None
    # [plugins.NAME] tables: a plugin's own options, checked by the plugin's Options when a build uses them
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return self.values[section][key]

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.values[name])

    def convert_options(self) -> dict[str, Any]:
        """The [convert] and model settings as ConvertRequest keyword arguments."""
        c, adapter = self.values["convert"], self.values["model"]["adapter"]
        return {
            "precision": c["precision"],
            "device": c["device"],
            "provider": c["provider"],
            "block_size": c["block_size"],
            "symmetric": c["symmetric"],
            "algorithm": c["algorithm"],
            "accuracy_level": c["accuracy_level"] or None,
            "calibration": Path(c["calibration"]) if c["calibration"] else None,
            "target": c["target"],
            "plugin_options": {name: dict(table) for name, table in self.plugins.items() if table},
            "adapter": Path(adapter) if adapter else None,
            "adapter_mode": self.values["model"]["adapter_mode"],
            "trust_remote_code": self.values["model"]["trust_remote_code"],
            **({"adapter_force": True} if self.values["model"]["adapter_force"] else {}),
        }

    def override(self, dotted: str, value: Any, origin: str) -> None:
        """Set a value from the command line; None means the flag was not given."""
        if value is None:
            return
        section, key = dotted.split(".")
        self.values[section][key] = _check_type(dotted, value, SCHEMA[section][key][1], None)
        self.origin[dotted] = origin

    def set_plugin_option(self, assignment: str, origin: str) -> None:
        """NAME.KEY=VALUE from the command line: VALUE read as a TOML value (200, 3e-5, true, "text"), else as text."""
        dotted, sep, text = assignment.partition("=")
        name, dot, key = dotted.strip().partition(".")
        if not (sep and dot and name and key):
            raise UsageError(f"--option {assignment!r}: write PLUGIN.KEY=VALUE, e.g. gptq.learned_scales=100")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        self.plugins.setdefault(name, {})[key.strip()] = value
        self.origin[f"plugins.{name}.{key.strip()}"] = origin


def find_config(start: Path | None = None) -> Path | None:
    """The nearest slmops.toml in the working directory or above it."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def _line_of(text: str, key: str) -> int | None:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\[?\s*\"?{re.escape(key)}\"?\s*[\]=]", line):
            return number
    return None


def _check_type(dotted: str, value: Any, kind: type, where: str | None) -> Any:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    at = f" ({where})" if where else ""
    if not ok:
        raise UsageError(f"{dotted} must be {kind.__name__}, not {type(value).__name__} {value!r}{at}")
    check = VALUE_CHECKS.get(dotted)
    if check and not check[0](value):
        raise UsageError(f"{dotted} = {value!r} is impossible: use {check[1]}{at}")
    return value


def load_config(path: Path | None = None, search: bool = True) -> Config:
    """Defaults, then the TOML file (given, or found by walking up), each value tagged with its origin."""
    if path is None and search:
        path = find_config()
    if path is None:
        return defaults()
    path = Path(path)
    if not path.exists():
        raise UsageError(f"config file {path} not found; pass an existing file to --config")
    text, data = read_toml(path, "slmops.toml")
    return with_tables(defaults(), data, path, text)


def defaults() -> Config:
    values = {
        s: {k: (list(v[0]) if isinstance(v[0], list) else v[0]) for k, v in keys.items()} for s, keys in SCHEMA.items()
    }
    return Config(values, {f"{s}.{k}": "default" for s, keys in SCHEMA.items() for k in keys}, None)


def read_toml(path: Path, what: str) -> tuple[str, dict[str, Any]]:
    """A small TOML file's text and tables, refused with one line when it is not one."""
    try:
        text = read_text_limited(path, what, limit=1 << 20)
    except SlmopsError as e:
        raise UsageError(str(e)) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML: {e}") from None


def with_tables(config: Config, data: dict[str, Any], path: Path, text: str) -> Config:
    """config with slmops.toml-shaped tables (section -> key -> value) applied, each value checked and tagged with
    the file and line it came from."""
    values = {section: dict(keys) for section, keys in config.values.items()}
    origin = dict(config.origin)
    plugins = {name: dict(table) for name, table in config.plugins.items()}
    for name, table in data.get("plugins", {}).items() if isinstance(data.get("plugins"), dict) else ():
        if not isinstance(table, dict):
            raise UsageError(f"{path}:{_line_of(text, name)}: plugins.{name} must be a table: [plugins.{name}]")
        plugins.setdefault(name, {}).update(table)
        origin.update({f"plugins.{name}.{key}": f"{path}:{_line_of(text, key)}" for key in table})
    for section, table in data.items():
        if section == "plugins" and isinstance(table, dict):
            continue
        if section not in SCHEMA or not isinstance(table, dict):
            line = _line_of(text, section)
            raise UsageError(f"{path}:{line}: unknown section [{section}]; known: {', '.join([*SCHEMA, 'plugins'])}")
        for key, value in table.items():
            dotted = f"{section}.{key}"
            line = _line_of(text, key)
            if key not in SCHEMA[section]:
                raise UsageError(
                    f"{path}:{line}: unknown key {dotted}; known in [{section}]: {', '.join(SCHEMA[section])}"
                )
            values[section][key] = _check_type(dotted, value, SCHEMA[section][key][1], f"{path}:{line}")
            origin[dotted] = f"{path}:{line}"
    return Config(values, origin, path, plugins)


def home() -> Path:
    """slmops's own cache: converted sources, builds, hash memo. $SLMOPS_HOME overrides."""
    where = os.environ.get("SLMOPS_HOME")
    path = Path(where).expanduser() if where else Path.home() / ".cache" / "slmops"
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"{'SLMOPS_HOME' if where else 'the cache folder'} {path} is a file, not a folder; "
            "point SLMOPS_HOME at a folder (it is created if missing)"
        )
    return path
