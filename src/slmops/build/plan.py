"""The plan stage of a build: the request checked against what the loaded plugins offer, its algorithm made the
faithful route for its source, and the cheapest route (a converter, then a quantizer) chosen."""

from __future__ import annotations

import dataclasses
from typing import Any

from slmops.doctor import TESTED_ARCHITECTURES
from slmops.errors import NoImplementation, SlmopsError
from slmops.host import machine
from slmops.plugin import provided
from slmops.plugin.roles import BLOCK_SIZES, Converter, ConvertRequest, Quantizer, options_of
from slmops.run.adapters import adapter_extractor

# Algorithms whose blocks always carry a minimum (or, Q8_0, a fixed zero point): never symmetric, however asked for
BLOCKS_WITH_MINIMUM = ("gptq", "q8_0")


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
    if request.keeps_adapter:
        adapter_extractor()  # refused now, not after the build, where no plugin keeps a LoRA apart
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
