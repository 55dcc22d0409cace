"""`slmops convert`: the build of one source and options, stage by stage: prepare (prepare.py: the source, a LoRA
merged) -> plan (plan.py: the route) -> build (a converter, then a quantizer) -> verify (verify.py) -> store and
publish (store.py: the manifest, the cache, --output). A build is made once per key: the source, the options, the
target and the code of the plugins and native libraries that make it."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

from slmops import extras, progress
from slmops.build import sources, verify
from slmops.build.plan import Route, check_options, plan, resolve_algorithm
from slmops.build.prepare import Prepared, prepare
from slmops.build.store import MANIFEST, is_intact, publish, read_manifest
from slmops.config import home
from slmops.errors import SlmopsError
from slmops.host import machine
from slmops.host.fsutil import (
    changed_files,
    check_disk,
    clean_stale,
    content_hash,
    copy_file,
    dir_size,
    file_hashes,
    lock,
    scratch_dir,
    staging_dir,
    write_json_atomic,
)
from slmops.measure import quality
from slmops.plugin.roles import Converter, ConvertRequest, Quantizer
from slmops.results import Build
from slmops.run import adapters, runtime

TOOLS = ("slmops", "onnxruntime", "onnxruntime-genai", "olive-ai", "onnx", "transformers", "torch")


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
            return f"{version}, checkout {checkout_hash(tuple(sorted(folders)))}"
        return version
    return content_hash(Path(source)) if source else cls.__module__


def installed_copy(source: Path) -> bool:
    """Whether a module file is an installed copy (in site-packages), not a checkout's file."""
    return any(part in ("site-packages", "dist-packages") for part in source.resolve().parts)


@functools.cache
def checkout_hash(folders: tuple[Path, ...]) -> str:
    """sources_hash once per process: the code a process runs is what it imported (and every build key and
    manifest asks for it)."""
    return sources_hash(list(folders))


def sources_hash(folders: list[Path]) -> str:
    """sha256 of the files in folders (sub-folders included, compiled bytecode left out), by path and content."""
    total = hashlib.sha256()
    for folder in folders:
        for rel, digest in file_hashes(folder, skip=("__pycache__",), follow_links=True).items():
            total.update(f"{rel}\0{digest}".encode())
    return total.hexdigest()[:16]


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
    spec = build_spec(source_spec, request_options, backend, quantizer_name)
    timings["plan_s"] = time.perf_counter() - start
    manifest = read_manifest(spec.build_dir)
    cached = is_intact(spec.build_dir, manifest, spec.key, say=False)
    if not cached:
        extras.need("torch", "building a model")  # the model builder reads the checkpoint with torch
        with lock(spec.build_dir):
            clean_stale(spec.build_dir.parent)  # what killed builds left behind
            manifest = read_manifest(spec.build_dir)
            cached = is_intact(spec.build_dir, manifest, spec.key)
            if not cached:
                # fp32 graph + quantized copy + staging, measured on SmolLM2
                check_disk(spec.build_dir.parent, 3 * dir_size(spec.request.source_dir), "the build")
                manifest = _build(spec, timings)
    path = publish(spec.build_dir, Path(output), manifest) if output else spec.build_dir
    return Build(path=Path(path), cached=cached, manifest=manifest)


# The options a source's fp32 reference shares with its other builds (no quantization options: an int4 and an int8 of
# one source share one reference)
REFERENCE_OPTIONS = ("device", "provider", "adapter", "adapter_mode", "trust_remote_code")


def reference(source_spec: str | None, options: dict[str, Any], backend: str = "auto") -> Build:
    """The fp32 build of a source that every build of it is measured against: the same source, adapter and target,
    no quantization options (so an int4 and an int8 of one source share one reference)."""
    keep = (*REFERENCE_OPTIONS, "adapter_force")
    return convert(source_spec, {"precision": "fp32", **{k: options[k] for k in keep if k in options}}, backend)


def route(
    source_spec: str | None,
    request_options: dict[str, Any],
    backend: str = "auto",
    output: str | None = None,
    quantizer_name: str = "auto",
) -> dict[str, Any]:
    """convert --dry-run: the route a build would take and whether it is cached; builds nothing."""
    spec = build_spec(source_spec, request_options, backend, quantizer_name)
    source, chosen = spec.source, spec.route
    return {
        "dry_run": True,
        "source": {"spec": source.spec, "kind": source.kind, "path": str(source.original)},
        "architecture": spec.prepared.architecture,
        "options": spec.request.options(),
        "converter": chosen.converter.name,
        "quantizer": chosen.quantizer.name if chosen.quantizer else None,
        "route": chosen.describe(),
        "cost": chosen.cost,
        "rejected": chosen.rejected,
        "alternatives": chosen.alternatives,
        "path": str(spec.build_dir),
        "cached": is_intact(spec.build_dir, read_manifest(spec.build_dir), spec.key, say=False),
        "output": output,
    }


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What one build is, settled before anything is built, and what every stage after planning reads: the source
    and its prepared checkpoint (a LoRA merged) with its architecture, the full request (every option, the target
    machine included), the route (converter and quantizer), the cache key over all of them and the code that makes
    them, and the cache folder the key names."""

    source: sources.Source
    prepared: Prepared
    request: ConvertRequest
    route: Route
    key: str
    build_dir: Path


def build_spec(
    source_spec: str | None, request_options: dict[str, Any], backend: str, quantizer_name: str
) -> BuildSpec:
    """The stages before the build: the source resolved (a GGUF dequantized once), the request checked and
    completed, the source prepared (prepare.py), the route planned (plan.py), the key taken."""
    with progress.step("Resolving the source"):
        source = sources.resolve(source_spec)
    gguf = Path(source.original) if source.kind in ("gguf", "default") else None
    options = dict(request_options)
    force = options.pop("adapter_force", False)  # a check to skip, not a build option: not in the cache key
    request = ConvertRequest(source_dir=source.checkpoint, gguf=gguf, **options)
    if request.calibration is not None:
        quality.calibration_text(request.calibration)  # a bad file is named now, not deep inside a quantizer
    request, why = resolve_algorithm(request)
    if why:
        progress.note(f"{request.precision} by {request.algorithm}: {why} (--algorithm chooses another)")
    if request.accuracy_level is None and request.device == "cpu" and request.precision in ("int4", "int8"):
        # MatMulNBits computes in int8 at level 4; at the default level 8-bit weights decode dozens of times slower
        # (docs/architecture.md, "The measurements behind the constants"; the builder already picks 4 for int4 on the CPU). The gguf-native route keeps its activation
        # outliers in float there (gguf_native.OUTLIER_CHANNELS); --accuracy-level 1 computes in float.
        request = dataclasses.replace(request, accuracy_level=4)
    check_options(request)
    prepared = prepare(source, request, force)
    request = dataclasses.replace(request, source_dir=prepared.checkpoint)
    chosen = plan(request, prepared.architecture, backend, quantizer_name)
    key = build_key(source.sha256, request, chosen.converter, chosen.quantizer)
    # The key names a build; the folder's name also says its source, so a moved or renamed source finds its build
    built = builds_named(request.precision, key)
    build_dir = (
        built[0]
        if built
        else home() / "builds" / f"{Path(source.original).stem.lower()}-{request.precision}-{key[:12]}"
    )
    return BuildSpec(source, prepared, request, chosen, key, build_dir)


def builds_named(precision: str, key: str) -> list[Path]:
    """The cache folders of a build key (named for their source, then precision and key: a moved source finds
    its build)."""
    return sorted((home() / "builds").glob(f"*-{precision}-{key[:12]}"))


def cached_fp32(spec: BuildSpec, into: Path) -> Path | None:
    """The graph a quantized build starts from, copied into `into` from this source's cached fp32 build where one
    is intact and was made by the same converter (code, options and tools in its key): deploy and bench build that
    reference first, and converting again was most of each candidate's build. A converter asked for fp32 builds the
    same graph whatever the quantization options say. The copies are checked against the fp32 build's manifest;
    None (into left empty) where there is no such build or a copy differs, and the converter runs."""
    request, converter = spec.request, spec.route.converter
    reference_request = ConvertRequest(
        source_dir=request.source_dir,
        gguf=request.gguf,
        precision="fp32",
        plugin_options=request.plugin_options,  # build_key keeps the converter's own only
        **{name: getattr(request, name) for name in REFERENCE_OPTIONS},
    )
    key = build_key(spec.source.sha256, reference_request, converter, None)
    found = builds_named(reference_request.precision, key)
    manifest = read_manifest(found[0]) if found else None
    if not (found and is_intact(found[0], manifest, key, say=False)):
        return None
    graph = {rel: digest for rel, digest in manifest["files"].items() if not Path(rel).name.startswith("slmops-")}
    try:
        for rel in graph:
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_file(found[0] / rel, into / rel)
    except OSError:  # removed meanwhile (cache rm, prune): convert instead
        pass
    if not changed_files(into, graph):
        return found[0]
    for f in [p for p in into.rglob("*") if p.is_file()]:
        f.unlink()
    return None


def _build(spec: BuildSpec, timings: dict[str, float]) -> dict[str, Any]:
    """Build, verify and store one spec: convert, (extract the adapter,) quantize into a staging folder, check it
    against its request and its source, write its manifest; renamed into spec.build_dir only when all passed."""
    source, request, architecture = spec.source, spec.request, spec.prepared.architecture
    converter, quantizer, key = spec.route.converter, spec.route.quantizer, spec.key
    with staging_dir(spec.build_dir) as out, scratch_dir(spec.build_dir.parent) as work:
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
        fp32 = cached_fp32(spec, model_dir) if quantizer is not None and not adapter else None
        if fp32 is not None:
            progress.note(f"the fp32 graph from the cached build {fp32.name} (the same converter and source)")
        else:
            with progress.step(
                f"Converting {architecture} with {converter.name} ({label if quantizer is None else 'fp32'})"
            ):
                converter.convert(
                    request if quantizer is None else dataclasses.replace(request, precision="fp32"),
                    model_dir,
                    work_dir,
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
            verification = verify.verify_build(
                out, request, quantizer.graph_facts(request) if quantizer else None, adapter
            )
        timings["verify_s"] = time.perf_counter() - t
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
            "verification": verification,
            "requires": machine.requirements(out),  # what the folder needs of the machine that runs it
            "files": file_hashes(out, skip=(MANIFEST,)),  # checked on every cache hit
        }
        write_json_atomic(out / MANIFEST, manifest)
    return manifest
