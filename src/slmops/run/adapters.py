"""LoRA adapters kept apart from the base: an ORT GenAI adapter file per adapter, switched on at run time.

The model builder writes the LoRA as separate low-rank MatMuls beside the base weights; a converter plugin that
extracts adapters (the Olive plugin, by Olive's ExtractAdapters pass) then moves their weights into an
`.onnx_adapter` file and makes them optional graph inputs (empty by default, so the base model runs unchanged when no
adapter is active)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from slmops.errors import SlmopsError
from slmops.host.fsutil import copy_tree
from slmops.plugin import provided
from slmops.plugin.roles import MODEL_FILES, Converter

ADAPTERS_DIR = "adapters"
SUFFIX = ".onnx_adapter"
DEFAULT = "(default)"  # apply(): the adapter the model was loaded with


def adapter_extractor() -> Converter:
    """The converter plugin that keeps a LoRA apart (extracts_adapters), or a one-line error naming what to do."""
    found = next((c for c in provided.converters() if c.extracts_adapters), None)
    if found is None:
        raise SlmopsError(
            "keeping a LoRA as an adapter file needs a converter plugin that extracts adapters (slmops's Olive plugin: "
            "pip install 'slmops[olive]'); or merge it into the base with --adapter-mode merge"
        )
    return found


def adapter_name(adapter: Path) -> str:
    """The name an adapter is switched on by: its folder's name, made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", adapter.resolve().name).strip("-.") or "adapter"


def extract(unmerged_dir: Path, output_dir: Path, name: str, work_dir: Path) -> None:
    """Turn a build with unmerged LoRA branches into a base model plus adapters/<name>.onnx_adapter, by the first
    converter plugin that extracts adapters (the Olive plugin: its ExtractAdapters pass)."""
    extractor = adapter_extractor()
    extracted = work_dir / "extracted-adapter"
    weights = extractor.extract_adapter(unmerged_dir, extracted, work_dir)
    if not weights.is_file():
        raise RuntimeError(f"{extractor.name} found no LoRA weights in the build")
    copy_tree(unmerged_dir, output_dir, skip=MODEL_FILES)  # genai_config.json, tokenizer files, chat template
    for graph_file in MODEL_FILES:
        if (extracted / graph_file).is_file():
            (extracted / graph_file).rename(output_dir / graph_file)
    (output_dir / ADAPTERS_DIR).mkdir(exist_ok=True)
    weights.rename(output_dir / ADAPTERS_DIR / f"{name}{SUFFIX}")


def find(model_dir: Path) -> dict[str, Path]:
    """The adapters of a model folder, by name."""
    folder = Path(model_dir) / ADAPTERS_DIR
    return {p.name[: -len(SUFFIX)]: p for p in sorted(folder.glob(f"*{SUFFIX}"))} if folder.is_dir() else {}


def runtime_fed_matmuls(model) -> list[str]:
    """MatMul nodes whose weight is a graph input (adapter weights fed at run time): never quantize those."""
    inputs = {i.name for i in model.graph.input}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inputs]


class ActiveAdapter:
    """The adapters of a loaded og.Model. name: the one a generator runs with unless told otherwise (the one named,
    else the folder's only adapter; "none": the base). Each is loaded from the folder at its first use, so an adapter
    added while the model is loaded (`slmops adapters add`) is found then; several can be in use at once, one per
    generator (`slmops serve` answers `base:adapter` per request)."""

    def __init__(self, og: Any, model: Any, model_dir: Path, name: str | None = None):
        self.og, self.model, self.model_dir = og, model, Path(model_dir)
        found = find(model_dir)
        if name is None and len(found) == 1:
            name = next(iter(found))
        self.handle: Any = None  # og.Adapters, made at the first load
        self.loaded: set[str] = set()
        self.lock = threading.Lock()
        self.name = self.load(name)

    def load(self, name: str | None) -> str | None:
        """name loaded (None or "none": the base, nothing to load); an adapter the folder lacks is refused."""
        if name in (None, "none"):
            return None
        with self.lock:
            if name not in self.loaded:
                found = find(self.model_dir)
                if name not in found:
                    have = ", ".join(found) or "none"
                    raise SlmopsError(
                        f"{self.model_dir} has no adapter {name!r} (it has: {have}); pick one of those, or none"
                    )
                if self.handle is None:
                    self.handle = self.og.Adapters(self.model)
                self.handle.load(str(found[name]), name)
                self.loaded.add(name)
        return name

    def apply(self, generator: Any, name: str | None = DEFAULT) -> None:
        """Switch an adapter on for this generator (before the first tokens are appended): name, else this model's."""
        name = self.name if name == DEFAULT else self.load(name)
        if name:
            generator.set_active_adapter(self.handle, name)
