"""`slmops convert`: choose a converter (and quantizer), build once per source and options, verify, record."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import adapters, extras, machine, progress, provided, quality, runtime, sources, verify
from .config import home
from .doctor import TESTED_ARCHITECTURES
from .errors import NoImplementation, SlmopsError
from .fsutil import (
    changed_files,
    check_disk,
    clean_stale,
    content_hash,
    copy_file,
    copy_tree,
    dir_size,
    file_hashes,
    lock,
    scratch_dir,
    seal,
    sealed_intact,
    staging_dir,
    write_json_atomic,
)
from .isolate import in_child
from .results import Build
from .roles import BLOCK_SIZES, Converter, ConvertRequest, Quantizer, options_of

MANIFEST = "slmops-manifest.json"
PACKAGED = "slmops-package.json"  # in a packaged (registered) model's folder: its files' hashes at validation
# The builds worth comparing, about smallest first (sizes measured on SmolLM2-135M): deploy --precision auto tries
# them in this order, bench --compare measures them all. "int4 gguf" is a GGUF source's own blocks (exact weights);
# other sources skip it. "int4 gptq" is the int4 of a float source (error-compensating rounding, Q4_0 to Q8_0
# blocks within llama.cpp Q4_K_M's bytes: on a float SmolLM2 mean KLD 0.018 against torch, imatrix 0.078), then the same
# within Q5_K_M's bytes (still 0.75x int8's); a GGUF source that passes with its own blocks stops before them. imatrix
# and the RTN builds stay for sources gptq cannot take.
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
TOOLS = ("slmops", "onnxruntime", "onnxruntime-genai", "olive-ai", "onnx", "transformers", "torch")
# Algorithms whose blocks always carry a minimum (or, Q8_0, a fixed zero point): never symmetric, however asked for
BLOCKS_WITH_MINIMUM = ("gptq", "q8_0")


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


def tool_versions() -> dict[str, str]:
    out = {}
    for dist in TOOLS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def plugin_code(implementation: object) -> str:
    """Which code an implementation is: the version of the distribution that ships its module, and where that module
    runs from a checkout (an editable install) a hash of the checkout's sources as they are now; or (a module that no
    distribution ships, such as a plugin put on the path by hand) a hash of its source file. In the cache key, so an
    upgraded or edited plugin's builds are made anew rather than reused."""
    cls = type(implementation)
    source = getattr(sys.modules.get(cls.__module__), "__file__", None)
    top = cls.__module__.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    if dists:
        version = ", ".join(f"{d} {importlib.metadata.version(d)}" for d in sorted(set(dists)))
        if source and not installed_copy(Path(source)):
            package = getattr(sys.modules.get(top), "__file__", None)
            folders = {Path(source).parent, *([Path(package).parent] if package else [])}
            return f"{version}, checkout {sources_hash(sorted(folders))}"
        return version
    return content_hash(Path(source)) if source else cls.__module__


def installed_copy(source: Path) -> bool:
    """Whether a module file is an installed copy (in site-packages), not a checkout's file."""
    return any(part in ("site-packages", "dist-packages") for part in source.resolve().parts)


def sources_hash(folders: list[Path]) -> str:
    """sha256 of the files in folders (sub-folders included, compiled bytecode left out), by path and content."""
    total = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                total.update(f"{path.relative_to(folder)}\0".encode())
                total.update(hashlib.sha256(path.read_bytes()).digest())
    return total.hexdigest()[:16]


def offered() -> dict[str, list[str]]:
    """What the loaded converter and quantizer plugins offer: precisions, int4 algorithms, devices, providers."""
    converters, quantizers = provided.converters(), provided.quantizers()

    def union(*groups: Any) -> list[str]:
        return sorted({v for group in groups for v in group})

    return {
        "precision": union(*(c.precisions for c in converters), *(q.precisions for q in quantizers)),
        "algorithm": union(*(c.algorithms for c in converters), *(q.algorithms for q in quantizers)),
        "device": union(*(c.devices for c in converters)),
        "provider": union(*(c.providers for c in converters)),
    }


def check_options(request: ConvertRequest) -> None:
    if request.target not in machine.TARGETS:
        raise SlmopsError(f"target {request.target!r} is unknown; use one of {', '.join(machine.TARGETS)}")
    choices = offered()
    for key in ("precision", "device", "provider"):
        value = getattr(request, key)
        if value not in choices[key]:
            raise SlmopsError(
                f"no installed plugin offers {key} {value!r}; use one of {', '.join(choices[key])} "
                "(`slmops plugins` lists what is installed)"
            )
    if request.precision == "int4" and request.algorithm not in choices["algorithm"]:
        raise SlmopsError(
            f"no installed plugin offers int4 algorithm {request.algorithm!r}; use one of {', '.join(choices['algorithm'])}"
        )
    if request.block_size not in BLOCK_SIZES:
        raise SlmopsError(
            f"block size {request.block_size} is not supported; use one of {', '.join(map(str, BLOCK_SIZES))}"
        )
    if request.accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise SlmopsError(f"accuracy level {request.accuracy_level} is not supported; use 0 (default) or 1-4")
    if request.precision == "fp16" and request.device == "cpu":
        # Seen with onnxruntime-genai 0.14.1 on onnxruntime 1.31: the fp16 CPU build fails at generation time
        # ("Shape mismatch attempting to re-use buffer"). Never hand over a model that cannot generate.
        raise SlmopsError(
            "fp16 models built for the CPU fail to generate with this ONNX Runtime GenAI; "
            "use --precision fp32 (same quality) or int8 (smaller, near-lossless)"
        )
    if request.adapter_mode not in ("merge", "adapter"):
        raise SlmopsError(f"adapter mode {request.adapter_mode!r} is unknown; use merge or adapter")
    check_plugin_options(request)


def check_plugin_options(request: ConvertRequest) -> None:
    """Every plugin named in the request's options is a loaded converter or quantizer that takes what it is given."""
    plugins = {p.name: p for p in [*provided.converters(), *provided.quantizers()]}
    for name in request.plugin_options:
        plugin = plugins.get(name)
        if plugin is None:
            raise SlmopsError(
                f"options for {name!r}, which is no loaded converter or quantizer; use one of "
                f"{', '.join(sorted(plugins))} (`slmops plugins` lists their options)"
            )
        try:
            options_of(plugin, request)
        except ValueError as e:
            known = ", ".join(plugin.Options.model_fields) or "none"
            raise SlmopsError(f"{e} (options of {name}: {known})") from None


@dataclasses.dataclass
class Route:
    """How a request gets built: a converter, then a quantizer if the converter does not build the precision."""

    converter: Converter
    quantizer: Quantizer | None
    cost: int
    rejected: list[str] = dataclasses.field(default_factory=list)  # "plugin: why not", for those that cannot
    alternatives: list[str] = dataclasses.field(default_factory=list)  # routes that could, at a higher cost

    def describe(self) -> str:
        return self.converter.name + (f" (fp32) + {self.quantizer.name}" if self.quantizer else "")


def plan(request: ConvertRequest, architecture: str, backend: str = "auto", quantizer: str = "auto") -> Route:
    """The cheapest route to the request: a converter that builds the precision itself, or one that builds fp32
    followed by a quantizer. Routes cost the sum of their plugins' costs. ``backend`` / ``quantizer`` name the
    converter / quantizer to use ("auto": any)."""
    request, _ = resolve_algorithm(request)
    converters = provided.converters()
    if backend != "auto":
        converters = [provided.by_name(converters, backend, "converter")]
    quantizers = provided.quantizers()
    if quantizer != "auto":
        quantizers = [provided.by_name(quantizers, quantizer, "quantizer")]
    reasons: list[str] = []
    routes: list[Route] = []
    broken = "its check() raised (see the warning)"
    for c in converters:
        why = provided.safely(c, "check", request, architecture, fallback=broken)
        if not why and quantizer != "auto":
            why = f"builds {request.precision} itself, but --quantizer {quantizer} was asked for"
        if not why and request.keeps_adapter and request.precision != "fp32":
            # a converter quantizing by itself would quantize the LoRA branches too, and they could not be swapped
            why = "keeps a LoRA as an adapter file only in an fp32 build (quantized afterwards around the adapter)"
        (reasons.append(f"{c.name}: {why}") if why else routes.append(Route(c, None, c.cost)))
    fp32 = dataclasses.replace(request, precision="fp32")
    bases = [c for c in converters if provided.safely(c, "check", fp32, architecture, fallback=broken) is None]
    for q in quantizers:
        why = provided.safely(q, "check", request, fallback=broken)
        if why:
            reasons.append(f"{q.name}: {why}")
            continue
        routes += [Route(b, q, b.cost + q.cost) for b in bases]
    if routes:
        best, *others = sorted(routes, key=lambda r: r.cost)
        best.rejected, best.alternatives = reasons, [f"{r.describe()} (cost {r.cost})" for r in others]
        return best
    known = sorted({a for c in converters for a in c.supported_architectures()})
    if known and architecture not in known:
        tested = [a for a in TESTED_ARCHITECTURES if a in known]
        untested = [a for a in known if a not in tested]
        raise NoImplementation(
            f"no converter can build {architecture} (config.json's architectures); tested: {', '.join(tested)}; "
            f"also known to the converters, not tested here: {', '.join(untested)}; a plugin can add more "
            "(docs/plugins.md)"
        )
    raise NoImplementation(
        f"no converter can build {architecture} at {request.precision} ({request.algorithm}): " + "; ".join(reasons)
    )


def build_key(source_sha: str, request: ConvertRequest, converter: Converter, quantizer: Quantizer | None) -> str:
    options = request.options()
    used = {converter.name, quantizer.name if quantizer else None}
    if "plugin_options" in options:  # only the options of the plugins that make this build
        options["plugin_options"] = {n: o for n, o in options["plugin_options"].items() if n in used}
        if not options["plugin_options"]:
            del options["plugin_options"]
    if request.adapter:
        options["adapter"] = content_hash(request.adapter)
    if request.calibration:  # the file, not where it lies: the same file in another folder makes the same build
        options["calibration"] = content_hash(request.calibration)
    blob = json.dumps(
        {
            "source": source_sha,
            "options": options,
            "converter": converter.name,
            "quantizer": quantizer.name if quantizer else None,
            "code": [plugin_code(converter), plugin_code(quantizer) if quantizer else None],
            # what the graph will hold (gguf-native: its kernel's MatMulGGML where this machine builds it, else
            # MatMulNBits), so a build made one way is not reused for the other
            "facts": quantizer.graph_facts(request) if quantizer else None,
            "tools": tool_versions(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


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
                in_child(_merge, base, adapter, tmp, trust_remote_code)
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


def convert(
    source_spec: str | None,
    request_options: dict[str, Any],
    backend: str = "auto",
    output: str | None = None,
    quantizer_name: str = "auto",
) -> Build:
    """Build (or find in the cache) a verified ORT GenAI model; with output, also publish it there."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    target = _target(source_spec, request_options, backend, quantizer_name)
    source, request, build_dir = target.source, target.request, target.build_dir
    timings["plan_s"] = time.perf_counter() - start
    manifest = read_manifest(build_dir)
    cached = is_intact(build_dir, manifest, target.key, say=False)
    if not cached:
        extras.need("torch", "building a model")  # the model builder reads the checkpoint with torch
        with lock(build_dir):
            clean_stale(build_dir.parent)  # what killed builds left behind
            manifest = read_manifest(build_dir)
            cached = is_intact(build_dir, manifest, target.key)
            if not cached:
                # fp32 graph + quantized copy + staging, measured on SmolLM2
                check_disk(build_dir.parent, 3 * dir_size(request.source_dir), "the build")
                route = target.route
                manifest = _build(
                    source,
                    request,
                    target.architecture,
                    route.converter,
                    route.quantizer,
                    target.key,
                    build_dir,
                    timings,
                )
    path = publish(build_dir, Path(output), manifest) if output else build_dir
    return Build(path=Path(path), cached=cached, manifest=manifest)


def reference(source_spec: str | None, options: dict[str, Any], backend: str = "auto") -> Build:
    """The fp32 build of a source that every build of it is measured against: the same source, adapter and target,
    no quantization options (so an int4 and an int8 of one source share one reference)."""
    keep = ("device", "provider", "adapter", "adapter_mode", "adapter_force", "trust_remote_code")
    return convert(source_spec, {"precision": "fp32", **{k: options[k] for k in keep if k in options}}, backend)


def route(
    source_spec: str | None,
    request_options: dict[str, Any],
    backend: str = "auto",
    output: str | None = None,
    quantizer_name: str = "auto",
) -> dict[str, Any]:
    """convert --dry-run: the route a build would take and whether it is cached; builds nothing."""
    target = _target(source_spec, request_options, backend, quantizer_name)
    source, plan_ = target.source, target.route
    return {
        "dry_run": True,
        "source": {"spec": source.spec, "kind": source.kind, "path": str(source.original)},
        "architecture": target.architecture,
        "options": target.request.options(),
        "converter": plan_.converter.name,
        "quantizer": plan_.quantizer.name if plan_.quantizer else None,
        "route": plan_.describe(),
        "cost": plan_.cost,
        "rejected": plan_.rejected,
        "alternatives": plan_.alternatives,
        "path": str(target.build_dir),
        "cached": is_intact(target.build_dir, read_manifest(target.build_dir), target.key, say=False),
        "output": output,
    }


@dataclasses.dataclass
class Target:
    """What a build request resolves to before anything is built: the source, the full request, the route and the
    cache folder its key names."""

    source: sources.Source
    request: ConvertRequest
    architecture: str
    route: Route
    key: str
    build_dir: Path


def resolve_algorithm(request: ConvertRequest) -> tuple[ConvertRequest, str | None]:
    """The request with algorithm "auto" made the faithful route for its source, and why (None: nothing to
    resolve). int4: a GGUF's own blocks for a GGUF source (exact), gptq for a float one; int8 of a float source:
    Q8_0 blocks in every weight; the builder's RTN where those cannot go (another block size, a LoRA kept as an
    adapter file)."""
    if request.algorithm in BLOCKS_WITH_MINIMUM:  # these always fit a minimum per block: one build, however asked for
        return dataclasses.replace(request, symmetric=False), None
    if request.precision not in ("int4", "int8") or request.algorithm != "auto":
        return request, None
    if request.gguf is not None:
        if request.precision == "int8":
            return request, None
        algorithm, why = "gguf", "the GGUF's own blocks, exact, where it has them"
    elif request.block_size != 32:
        algorithm, why = "rtn", f"block size {request.block_size}: slmops's blocks are 32 wide, so the builder's RTN"
    elif request.keeps_adapter:
        algorithm, why = "rtn", "a LoRA kept as an adapter file: RTN around it"
    elif request.precision == "int8":
        algorithm = "q8_0"
        why = "a float source: Q8_0 blocks in every weight, embedding and output layer included (llama.cpp's bytes)"
    else:
        algorithm = "gptq"
        why = "a float source: error-compensating rounding, Q4_0 to Q8_0 blocks by measured error in Q4_K_M's bytes"
    return resolve_algorithm(dataclasses.replace(request, algorithm=algorithm))[0], why


def _target(source_spec: str | None, request_options: dict[str, Any], backend: str, quantizer_name: str) -> Target:
    with progress.step("Resolving the source"):
        source = sources.resolve(source_spec)
    checkpoint, source_sha = source.checkpoint, source.sha256
    gguf = Path(source.original) if source.kind in ("gguf", "default") else None
    options = dict(request_options)
    force = options.pop("adapter_force", False)  # a check to skip, not a build option: not in the cache key
    request = ConvertRequest(source_dir=checkpoint, gguf=gguf, **options)
    if request.calibration is not None:
        quality.calibration_text(request.calibration)  # a bad file is named now, not deep inside a quantizer
    request, why = resolve_algorithm(request)
    if why:
        progress.note(f"{request.precision} by {request.algorithm}: {why} (--algorithm chooses another)")
    if request.accuracy_level is None and request.device == "cpu" and request.precision in ("int4", "int8"):
        # MatMulNBits computes in int8 at level 4. At the default level, 8-bit weights decoded SmolLM2 at 1.5 tok/s
        # against 59 at level 4 (the builder already picks 4 for int4 on the CPU). The gguf-native route keeps its
        # activation outliers in float there (gguf_native.OUTLIER_CHANNELS); --accuracy-level 1 computes in float.
        request = dataclasses.replace(request, accuracy_level=4)
    check_options(request)
    if request.adapter is not None:
        check_adapter(request.adapter)
        why = adapter_mismatch(request.adapter, checkpoint)
        if why and not force:
            raise SlmopsError(
                f"adapter {request.adapter} does not belong to this source: {why}; give the adapter made for this "
                "model, or pass --force to apply it anyway"
            )
        if request.adapter_mode == "merge":
            checkpoint = merge_adapter(checkpoint, source_sha, request.adapter, request.trust_remote_code)
            request = dataclasses.replace(request, source_dir=checkpoint)
    architecture = architecture_of(checkpoint)
    chosen = plan(request, architecture, backend, quantizer_name)
    key = build_key(source_sha, request, chosen.converter, chosen.quantizer)
    # The key names a build; the folder's name also says its source, so a moved or renamed source finds its build
    built = sorted((home() / "builds").glob(f"*-{request.precision}-{key[:12]}"))
    build_dir = (
        built[0]
        if built
        else home() / "builds" / f"{Path(source.original).stem.lower()}-{request.precision}-{key[:12]}"
    )
    return Target(source, request, architecture, chosen, key, build_dir)


def is_intact(build_dir: Path, manifest: dict[str, Any] | None, key: str, say: bool = True) -> bool:
    """A verified build of this key whose files are all as they were written (a cache hit)."""
    if not (manifest and manifest.get("key") == key and manifest.get("verification", {}).get("ok")):
        return False
    changed = changed_files(build_dir, manifest.get("files") or {}) if "files" in manifest else ["(no file list)"]
    if changed and say:
        progress.note(
            f"the cached build {build_dir.name} was changed since it was verified ({', '.join(changed[:3])}): rebuilding"
        )
    return not changed


def _build(
    source: sources.Source,
    request: ConvertRequest,
    architecture: str,
    converter: Converter,
    quantizer: Quantizer | None,
    key: str,
    build_dir: Path,
    timings: dict[str, float],
) -> dict[str, Any]:
    with staging_dir(build_dir) as out, scratch_dir(build_dir.parent) as work:
        work_dir = Path(work)
        label = f"{request.precision}" + (
            f" block {request.block_size}, {'sym' if request.symmetric else 'asym'}"
            if request.precision in ("int4", "int8")
            else ""
        )
        adapter = adapters.adapter_name(request.adapter) if request.keeps_adapter else None
        # Each step writes into a fresh folder: the last one writes straight into the staging folder.
        model_dir = out if quantizer is None and not adapter else work_dir / "converted"
        model_dir.mkdir(exist_ok=True)
        t = time.perf_counter()
        with progress.step(
            f"Converting {architecture} with {converter.name} ({label if quantizer is None else 'fp32'})"
        ):
            converter.convert(
                request if quantizer is None else dataclasses.replace(request, precision="fp32"), model_dir, work_dir
            )
        timings["convert_s"] = time.perf_counter() - t
        if adapter:
            extracted = out if quantizer is None else work_dir / "extracted"
            extracted.mkdir(exist_ok=True)
            t = time.perf_counter()
            with progress.step(f"Extracting adapter {adapter!r} (Olive ExtractAdapters)"):
                adapters.extract(model_dir, extracted, adapter, work_dir)
            timings["adapter_s"] = time.perf_counter() - t
            model_dir = extracted
        if quantizer is not None:
            t = time.perf_counter()
            with progress.step(f"Quantizing to {label} with {quantizer.name}"):
                quantizer.quantize(model_dir, out, request)
            timings["quantize_s"] = time.perf_counter() - t
        if not (out / "genai_config.json").is_file():
            raise SlmopsError(f"converter {converter.name} wrote no genai_config.json; the build is unusable")
        runtime.use_every_core(out)
        t = time.perf_counter()
        with progress.step("Verifying: reading the graph back, generating, comparing with the source in torch"):
            graph = verify.graph_quantization(out)
            problems = verify.compare(request, graph, quantizer.graph_facts(request) if quantizer else None)
            try:
                sample = verify.generate_check(out)
            except Exception as e:
                sample, problems = None, problems + [f"ORT GenAI cannot generate: {type(e).__name__}: {e}"]
            found = None
            if not problems and not adapter:  # with an adapter kept apart, the source is base plus adapter
                found = verify.against_source(out, request)
                problems += verify.source_problems(request, found)
            effect = None
            if adapter and not problems:
                try:
                    effect = adapters.check_effect(out, adapter)
                    if effect["max_logit_change"] == 0:
                        problems.append(f"the adapter {adapter!r} loads but changes nothing: the LoRA was not applied")
                except Exception as e:
                    problems.append(f"ORT GenAI cannot apply the adapter {adapter!r}: {type(e).__name__}: {e}")
        timings["verify_s"] = time.perf_counter() - t
        if problems:
            raise SlmopsError("verification failed, nothing was written: " + "; ".join(problems))
        manifest = {
            "key": key,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "source": {
                "spec": source.spec,
                "kind": source.kind,
                "path": str(source.original),
                "sha256": source.sha256,
                "checkpoint": str(request.source_dir),
                "architecture": architecture,
            },
            "options": request.options(),
            "converter": converter.name,
            "quantizer": quantizer.name if quantizer else None,
            "code": [plugin_code(converter), plugin_code(quantizer) if quantizer else None],
            "tools": tool_versions(),
            "output_bytes": dir_size(out),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "adapters": {name: str(path.relative_to(out)) for name, path in adapters.find(out).items()},
            "verification": {"ok": True, "graph": graph, "sample": sample, "source": found, "adapter": effect},
            "requires": machine.requirements(out),  # what the folder needs of the machine that runs it
            "files": file_hashes(out, skip=(MANIFEST,)),  # checked on every cache hit
        }
        write_json_atomic(out / MANIFEST, manifest)
    return manifest


def publish(build_dir: Path, output: Path, manifest: dict[str, Any]) -> Path:
    """Put a copy of the build at the user's --output. A new or empty folder gets the whole build in one rename; in
    an earlier slmops build only slmops's own files are replaced, one by one and each atomically, and every other
    file, folder and link there stays exactly as it was. A folder that is not an slmops build (unless empty), a
    registered model's folder, and slmops's own cache are refused."""
    output = output.expanduser().absolute()
    if (output / PACKAGED).exists():
        raise SlmopsError(
            f"{output} is a registered model's folder (a registry owns it); choose another --output folder, "
            "and use `slmops deploy` or `slmops register --replace` to change a registered model"
        )
    if output.resolve().is_relative_to(home().resolve()):
        raise SlmopsError(f"{output} is inside slmops's own cache ({home()}); choose an --output folder outside it")
    existing = read_manifest(output)
    if existing and existing.get("key") == manifest["key"] and not changed_files(output, manifest["files"]):
        return output
    if output.is_file() or (output.exists() and any(output.iterdir()) and existing is None):
        raise SlmopsError(f"{output} exists and is not an slmops model; choose an empty or new --output folder")
    try:
        with lock(output):
            if existing is None:
                with staging_dir(output) as tmp:
                    copy_tree(build_dir, tmp)
            else:
                _replace_ours(build_dir, output, manifest, existing)
    except PermissionError as e:
        raise SlmopsError(
            f"cannot write to {output}: permission denied ({e.filename}); choose a writable --output folder"
        ) from None
    return output


def _replace_ours(build_dir: Path, output: Path, manifest: dict[str, Any], existing: dict[str, Any]) -> None:
    """In an earlier build at output: each file of the new build in place (a copy beside it, then a rename), the
    earlier build's files the new one lacks removed, the manifest last. Nothing else there is touched."""
    clean_stale(output)  # a killed publish's half-copied files
    new, old = set(manifest["files"]), set(existing.get("files") or {})
    for rel in sorted(new):
        target = output / rel
        for parent in [output / p for p in Path(rel).parents if p != Path(".")]:
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise SlmopsError(f"{parent} is not a folder of the earlier build; move it away and publish again")
        if target.is_dir() and not target.is_symlink():
            raise SlmopsError(f"{target} is a folder where the build has a file; move it away and publish again")
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(build_dir / rel, target)
    for rel in sorted(old - new):
        if (output / rel).is_file() and not (output / rel).is_symlink():
            (output / rel).unlink()
    _copy_atomic(build_dir / MANIFEST, output / MANIFEST)


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}-copy")
    try:
        copy_file(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
