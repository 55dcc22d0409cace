"""The source stage of a build: a LoRA adapter checked and (merge) merged into the base, the architecture read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from slmops import extras, progress
from slmops.build import sources
from slmops.config import home
from slmops.errors import SlmopsError
from slmops.host.fsutil import content_hash, lock, seal, sealed_intact, staging_dir
from slmops.host.isolate import in_child
from slmops.plugin.roles import ConvertRequest


@dataclasses.dataclass
class Prepared:
    """The source as the build reads it: the checkpoint (the LoRA merged into it where asked) and its architecture."""

    checkpoint: Path
    architecture: str


def prepare(source: sources.Source, request: ConvertRequest, force: bool = False) -> Prepared:
    """The source stage: a LoRA adapter checked against the source (force: apply one that names another base) and,
    with adapter_mode merge, merged into a checkpoint of its own (made once); the architecture read."""
    checkpoint = source.checkpoint
    if request.adapter is not None:
        check_adapter(request.adapter)
        why = adapter_mismatch(request.adapter, checkpoint)
        if why and not force:
            raise SlmopsError(
                f"adapter {request.adapter} does not belong to this source: {why}; give the adapter made for this "
                "model, or pass --force to apply it anyway"
            )
        if request.adapter_mode == "merge":
            checkpoint = merge_adapter(checkpoint, source.sha256, request.adapter, request.trust_remote_code)
    return Prepared(checkpoint, architecture_of(checkpoint))


def architecture_of(checkpoint: Path) -> str:
    config = sources.check_checkpoint(checkpoint)
    archs = config.get("architectures") or []
    if not archs:
        raise SlmopsError(f'{checkpoint}/config.json names no architecture; add "architectures": ["...ForCausalLM"]')
    return archs[0]


def check_adapter(adapter: Path) -> None:
    if not adapter.is_dir():
        raise SlmopsError(f"adapter {adapter} does not exist; give the folder with adapter_config.json")
    if not (adapter / "adapter_config.json").is_file():
        raise SlmopsError(f"{adapter} is not a PEFT adapter (no adapter_config.json); give the folder peft saved")
    if not any((adapter / f"adapter_model.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise SlmopsError(
            f"{adapter} has no adapter weights (adapter_model.safetensors or .bin); give the folder peft saved"
        )
    for weights in adapter.glob("*.safetensors"):
        sources.check_safetensors(weights)


def adapter_mismatch(adapter: Path, checkpoint: Path) -> str | None:
    """Why the adapter was made for another model than the source, where its adapter_config.json says so: the base
    it names is a folder here whose architecture or model type differs from the source's. None where it fits or
    nothing can be compared (a hub name that is not on this machine)."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(base, str) or not base or not (Path(base).expanduser() / "config.json").is_file():
        return None
    try:
        theirs = json.loads((Path(base).expanduser() / "config.json").read_text())
        ours = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("model_type", "architectures"):
        if theirs.get(key) and ours.get(key) and theirs[key] != ours[key]:
            return f"it was trained on {base} ({key} {theirs[key]}), the source is {ours[key]}"
    return None


def merge_adapter(base: Path, base_sha: str, adapter: Path, trust_remote_code: bool) -> Path:
    """A checkpoint with a PEFT LoRA adapter merged into the base weights, made once into the cache."""
    target = home() / "sources" / f"merged-{base_sha[:10]}-{content_hash(adapter)[:10]}"
    if sealed_intact(target):
        return target
    extras.need("torch", "merging a LoRA adapter")
    with lock(target):
        if not sealed_intact(target):  # missing, or damaged since: made again
            with progress.step("Merging the LoRA adapter into the base"), staging_dir(target) as tmp:
                in_child(_merge, base, adapter, tmp, trust_remote_code, warm=True)
                seal(tmp)
    return target


def _merge(base: Path, adapter: Path, out: Path, trust_remote_code: bool) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except Exception as e:
        raise SlmopsError(
            f"adapter {adapter} does not fit the base model: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
