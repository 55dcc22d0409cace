"""The one module a slmops plugin imports: roles, the hook marker, and the helpers plugins need.

Everything else in slmops is internal and may change between releases; what is named here keeps working. The
built-in plugins (slmops/plugins/) import nothing else from slmops, and a test holds them to it.

- Roles: subclass :class:`Converter`, :class:`Quantizer`, :class:`Registry`, :class:`Benchmarker`, or fill a
  :class:`TemplateFamily`, and hand it to the ``register`` callback of the matching hook (docs/hooks.md).
- Errors: raise :class:`SlmopsError` with one line that says what is wrong and what to do; slmops prints it
  without a traceback and exits non-zero. Any other exception is reported as a bug of the plugin.
- Files: write through :func:`staging_dir` / :func:`replace_dir` (a temporary path, then a rename), guard shared
  files with :func:`lock`, copy model folders with :func:`copy_tree` (it carries every non-graph file: config,
  tokenizer, adapters/), and write JSON with :func:`write_json_atomic`. A plugin that puts native code in a folder
  writes what it needs of the machine to :data:`REQUIRES` (``{"what", "os", "machine": [...], "cpu_flags": [...]}``);
  register, deploy and model run refuse a folder this machine cannot run.
- Config: :func:`current_config` is the slmops.toml of the running command (for a plugin command too), and
  :func:`open_registry` the registry it names.
- Runtime: :class:`Session` runs a model folder with ONNX Runtime GenAI (encode, logits, generate, stream).
"""

from __future__ import annotations

from slmops.config import Config, home, load_config
from slmops.errors import SlmopsError
from slmops.extras import need as need_extra
from slmops.extras import problem as extra_problem
from slmops.host.cpus import allowed_cpus, available_memory, by_row_runs
from slmops.host.fsutil import (
    clean_stale,
    copy_tree,
    dir_size,
    fault_point,
    lock,
    rename,
    replace_dir,
    staging_dir,
    write_json_atomic,
)
from slmops.host.isolate import die_with_parent, in_child
from slmops.host.machine import REQUIRES, native_code_for
from slmops.measure.quality import calibration_text
from slmops.plugin.hookspecs import hookimpl
from slmops.plugin.roles import (
    BENCH_RESULT_KEYS,
    BLOCK_SIZES,
    CHAT_DEFAULTS,
    MODEL_FILES,
    Benchmarker,
    BenchmarkResult,
    Converter,
    ConvertRequest,
    GraphFacts,
    ModelInfo,
    PluginOptions,
    Quantizer,
    Registry,
    RegistryEntry,
    SweepRow,
    TemplateFamily,
    ToolSyntax,
    options_of,
)
from slmops.progress import count as progress_count
from slmops.run.adapters import runtime_fed_matmuls
from slmops.run.chat import OrtGenAIChat
from slmops.run.runtime import Session

__all__ = [
    "allowed_cpus",
    "by_row_runs",
    "available_memory",
    "in_child",
    "BENCH_RESULT_KEYS",
    "BLOCK_SIZES",
    "CHAT_DEFAULTS",
    "MODEL_FILES",
    "REQUIRES",
    "native_code_for",
    "BenchmarkResult",
    "Benchmarker",
    "Config",
    "ConvertRequest",
    "Converter",
    "GraphFacts",
    "ModelInfo",
    "OrtGenAIChat",
    "SweepRow",
    "PluginOptions",
    "Quantizer",
    "Registry",
    "RegistryEntry",
    "Session",
    "SlmopsError",
    "TemplateFamily",
    "ToolSyntax",
    "calibration_text",
    "clean_stale",
    "copy_tree",
    "current_config",
    "die_with_parent",
    "dir_size",
    "extra_problem",
    "need_extra",
    "fault_point",
    "hookimpl",
    "home",
    "lock",
    "open_registry",
    "progress_count",
    "options_of",
    "rename",
    "replace_dir",
    "runtime_fed_matmuls",
    "staging_dir",
    "write_json_atomic",
]


def current_config() -> Config:
    """The settings of the running command (its --config, else slmops.toml found walking up, else defaults)."""
    import click

    ctx = click.get_current_context(silent=True)
    state = ctx.find_root().obj if ctx else None
    return state.config if state is not None and hasattr(state, "config") else load_config()


def open_registry(config: Config | None = None, name: str | None = None) -> Registry:
    """The registry named by ``name``, else by the config's ``[registry] backend``, with its root folder set."""
    from slmops.registry import open_registry as _open

    return _open(config or current_config(), name)
