"""What a plugin registers for each role. Subclass these (or fill the dataclasses) in a plugin."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict

BLOCK_SIZES = (16, 32, 64, 128, 256)  # quantization block sizes MatMulNBits takes
MODEL_FILES = ("model.onnx", "model.onnx.data")  # the graph and its weights; the rest of a folder goes along as is
# A template family's ModelConfig (inference_model.json) unless it says otherwise.
CHAT_DEFAULTS = {"max_length": 2048, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
# What every benchmarker's run() must return (numbers); anything else it returns is shown as an extra metric.
BENCH_RESULT_KEYS = ("decode_tok_s", "ttft_ms_p50")


class GraphFacts(TypedDict):
    """What a quantizer's written graph must show (Quantizer.graph_facts), read back after quantize() and held in
    the build cache key."""

    ops: list[str]  # op types of which at least one node must appear
    kernel: NotRequired[str]  # the native library the folder carries, by a hash of its bytes


class SweepRow(TypedDict, total=False):
    """One prompt length of a benchmarker's sweep (BenchmarkResult's "sweep")."""

    prompt_tokens: int
    ttft_ms_p50: float
    prefill_tok_s: float
    decode_tok_s: float  # the median run's
    decode_tok_s_best: float
    latency_ms_p50: float
    latency_ms_p95: float
    generated_tokens: int
    runs: int
    decode_cpu_ms_per_token: float  # CPU time per decoded token on one thread


class BenchmarkResult(TypedDict, total=False):
    """What Benchmarker.run returns: BENCH_RESULT_KEYS at least; any other number is shown as an extra metric."""

    benchmarker: str
    decode_tok_s: float
    ttft_ms_p50: float
    load_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    peak_rss_mb: float
    peak_rss_scope: str
    cpu_utilisation: float  # of the CPUs the process may use
    soak_requests: int
    rss_growth_mb: float
    max_new_tokens: int
    sweep: list[SweepRow]


@dataclass(frozen=True)
class ConvertRequest:
    """Everything a conversion depends on; its fields (with the source hash) make the cache key."""

    source_dir: Path
    precision: str = "int4"
    device: str = "cpu"
    provider: str = "CPUExecutionProvider"
    block_size: int = 32
    symmetric: bool = True
    algorithm: str = "auto"  # "auto": gguf for a GGUF source, gptq for a float one (convert.default_int4)
    accuracy_level: int | None = None
    adapter: Path | None = None
    adapter_mode: str = "merge"  # "merge" into the weights, or "adapter": an ORT GenAI adapter file beside the base
    trust_remote_code: bool = False
    gguf: Path | None = None  # the GGUF file when the source is one (source_dir is then its dequantized checkpoint)
    calibration: Path | None = None  # a JSONL file of the user's own text for the data-aware quantizers
    # "native": this machine's fastest code (the GGUF kernel where it runs); "portable": none; a platform
    # (machine.NAMED_TARGETS): native code where it is this machine's (api.native_code_for), else none
    target: str = "native"
    # plugin name -> its options as given ([plugins.NAME] in slmops.toml, --option NAME.KEY=VALUE); the plugin reads
    # them, checked, through options_of(plugin, request)
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Paths given as strings (the Python API: convert.convert(src, {"calibration": "rows.jsonl"})) taken as paths
        for name in ("source_dir", "adapter", "gguf", "calibration"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))

    @property
    def keeps_adapter(self) -> bool:
        """A LoRA adapter kept apart from the base weights (fed at run time), not merged into them."""
        return self.adapter is not None and self.adapter_mode == "adapter"

    def options(self) -> dict[str, Any]:
        """The options as plain JSON values, without the source paths (the source's hash is in the cache key)."""
        d = dataclasses.asdict(self)
        d.pop("source_dir")
        d.pop("gguf")
        d["adapter"] = str(self.adapter) if self.adapter else None
        d["calibration"] = str(self.calibration) if self.calibration else None
        if not self.plugin_options:  # absent, not empty: builds made before plugins had options keep their keys
            d.pop("plugin_options")
        return d


class PluginOptions(BaseModel):
    """A plugin's own settings: subclass it as the plugin's ``Options`` with a field per setting (type, default and
    ``Field(description=...)``); slmops checks what the user gives against it before any work starts and puts the
    values in the build's cache key. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def options_of(plugin: Converter | Quantizer, request: ConvertRequest) -> PluginOptions:
    """The plugin's options for this request: what the user gave for it, over its defaults (ValueError when they
    do not fit its Options)."""
    from pydantic import ValidationError

    given = request.plugin_options.get(plugin.name, {})
    try:
        return plugin.Options(**given)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "?"
        raise ValueError(f"option {plugin.name}.{key}: {first['msg']}") from None


class Converter:
    """Builds an ONNX Runtime GenAI folder (genai_config.json, model.onnx, tokenizer) from a checkpoint."""

    name: str = ""
    description: str = ""
    precisions: tuple[str, ...] = ()  # precisions built directly
    algorithms: tuple[str, ...] = ("rtn",)  # int4 algorithms offered
    devices: tuple[str, ...] = ("cpu",)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    cost: int = 100  # lower wins when several converters accept a request
    extracts_adapters: bool = False  # it implements extract_adapter (a LoRA kept apart: --adapter-mode adapter)
    Options: type[PluginOptions] = PluginOptions  # its own settings (none unless it says)

    def check(self, request: ConvertRequest, architecture: str) -> str | None:
        """Return None if this converter can do the request, else the reason it cannot."""
        if request.precision not in self.precisions:
            return f"builds {', '.join(self.precisions)} only"
        if request.precision == "int4" and request.algorithm not in self.algorithms:
            return f"int4 algorithms: {', '.join(self.algorithms)}"
        return None

    def supported_architectures(self) -> tuple[str, ...]:
        """The config.json architectures this converter builds (shown when none fits); () if it cannot tell."""
        return ()

    def convert(self, request: ConvertRequest, output_dir: Path, work_dir: Path) -> None:
        """Write the model into output_dir (which exists and is empty); work_dir is scratch space. Asked for fp32
        (the input of a quantizer), write the same graph whatever the request's quantization options say: slmops
        takes the source's cached fp32 build of this converter in its place."""
        raise NotImplementedError

    def extract_adapter(self, unmerged_dir: Path, output_dir: Path, work_dir: Path) -> Path:
        """A converter with extracts_adapters: from a build whose LoRA branches are separate MatMuls (unmerged_dir),
        write to output_dir the base graph (model.onnx, model.onnx.data) with the LoRA weights as optional inputs,
        empty by default; return the ORT GenAI adapter file (.onnx_adapter) it wrote there."""
        raise NotImplementedError


class Quantizer:
    """Rewrites an fp32 ONNX GenAI folder's MatMul weights at a lower precision, carrying everything but
    MODEL_FILES over as it is (config, tokenizer, adapters/). A MatMul whose weight is a graph input (an
    adapter's, fed at run time) must stay as it is: see slmops.run.adapters.runtime_fed_matmuls."""

    name: str = ""
    description: str = ""
    precisions: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("rtn",)  # what --algorithm values it answers to
    cost: int = 10  # added to the fp32 converter's cost when slmops compares routes
    Options: type[PluginOptions] = PluginOptions  # its own settings (none unless it says)

    def check(self, request: ConvertRequest) -> str | None:
        if request.precision not in self.precisions:
            return f"quantizes to {', '.join(self.precisions)} only"
        return None

    def quantize(self, fp32_dir: Path, output_dir: Path, request: ConvertRequest) -> None:
        raise NotImplementedError

    def graph_facts(self, request: ConvertRequest) -> GraphFacts:
        """What the written graph must show, read back by slmops after quantize(): ``ops``, op types of which at
        least one node must appear. For MatMulNBits slmops also checks bits, block size, symmetry and accuracy level
        against the request. Quality is judged separately, measured against the fp32 build (deploy's gate)."""
        return {"ops": ["MatMulNBits"]}


@dataclass
class ModelInfo:
    """What detection looks at in a model folder."""

    path: Path
    model_type: str = ""
    architectures: list[str] = field(default_factory=list)
    chat_template: str | None = None
    special_tokens: set[str] = field(default_factory=set)
    bos_token: str | None = None
    eos_token: str | None = None


HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{Tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call>"
    ' XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolSyntax:
    """How a family's models call tools (the default: Qwen2.5's, Hermes's and SmolLM3's). A call is call_start, the
    JSON object {"name": ..., arguments_key: {...}}, call_end, one after another when there are several; in_list
    families (Mistral, Phi-4-mini, Granite) write all of a turn's calls as one JSON array between call_start and
    call_end. Where the model's own chat template takes tools, it describes them and writes earlier calls and results;
    otherwise slmops does, with instructions (appended to the system message; {Tools}: one JSON line per tool, or one
    JSON array for in_list families) and result (a tool's result as a user turn; {Content}: the result)."""

    call_start: str = "<tool_call>\n"
    call_end: str = "\n</tool_call>"
    arguments_key: str = "arguments"
    instructions: str = HERMES_TOOLS
    result: str = "<tool_response>\n{Content}\n</tool_response>"
    in_list: bool = False

    def opening(self) -> str:
        """How an answer that calls a tool begins."""
        return self.call_start or ("[" if self.in_list else "{")


@dataclass
class TemplateFamily:
    """A prompt format. Each PromptTemplate field holds one whole turn, separators included, with
    ``{Content}`` where the text goes, so a prompt is the plain concatenation of its turns."""

    name: str
    description: str
    system: str
    user: str
    assistant: str
    prompt: str  # the last user turn plus the start of the assistant's answer
    stop: list[str] = field(default_factory=list)
    model_config: dict[str, Any] = field(default_factory=dict)
    bos: str = ""  # text before the first turn, as the tokenizer's template writes it
    system_in_first_user: str | None = None  # families with no system role: how to fold it in
    model_types: tuple[str, ...] = ()  # config.json model_type values of this family
    markers: tuple[str, ...] = ()  # strings found in this family's chat templates
    tools: ToolSyntax = field(default_factory=ToolSyntax)  # how its models call tools

    def prompt_template(self) -> dict[str, str]:
        return {"system": self.system, "user": self.user, "assistant": self.assistant, "prompt": self.prompt}

    def score(self, info: ModelInfo) -> int:
        """How well this family fits a model folder: 0 for no, higher for surer. A model's own chat template
        decides when it has one; model_type (a llama can speak ChatML) only when it has none."""
        if info.chat_template:
            if not self.markers or not all(m in info.chat_template for m in self.markers):
                return 0
            return 10 * len(self.markers) + (5 if info.model_type in self.model_types else 0)
        # No template: the model_type and the family's special tokens in the vocabulary must both agree.
        tokens = [m for m in self.markers if m.startswith("<")]
        if info.model_type in self.model_types and tokens and all(m in info.special_tokens for m in tokens):
            return 5
        return 0


@dataclass
class RegistryEntry:
    name: str
    id: str
    path: str
    family: str = ""
    precision: str = ""
    size_bytes: int = 0
    registered_at: str = ""
    version: str = "1"
    description: str = ""
    registry: str = ""
    status: str = (
        "ok"  # "missing": folder gone (`slmops cache rm NAME` cleans it); "changed": files edited since validation
    )


class Registry:
    """A place where deployed models are recorded, found, run and removed."""

    name: str = ""
    description: str = ""
    constrains: bool = False  # its runtime's chat() keeps an answer to options["constraint"] (a JSON schema, a grammar)
    root: Path | None = None  # set by the core: slmops.toml, $SLMOPS_REGISTRY_DIR, or default_location()

    def default_location(self) -> Path:
        raise NotImplementedError

    def register(self, model_dir: Path, entry: RegistryEntry, inference_model: dict, replace: bool) -> RegistryEntry:
        """Copy model_dir into the registry under entry.name, with inference_model.json, and record it. If it
        fails, or the process is killed, an earlier model of that name must still be registered and intact."""
        raise NotImplementedError

    def list(self) -> list[RegistryEntry]:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def runtime_problem(self) -> str | None:
        """None when this registry's runtime (if it has one) can start on this machine, else why not; for doctor."""
        return None

    def load(self, name: str) -> bool:
        """Load a registered model into this registry's runtime ahead of chat(); False when it has no runtime."""
        return False

    def chat(
        self, name: str, messages: list[dict[str, str]], options: dict[str, Any], usage: dict[str, int]
    ) -> Iterator[str]:
        """Stream the answer through this registry's own runtime, filling usage with token counts at the end.
        options: as OrtGenAIChat.stream takes them; "constraint" (a structure.Constraint: kind "json_schema" or
        "lark_grammar", and its grammar) only where constrains is true. Registries without a runtime raise
        NotImplementedError; slmops then runs the model with ORT GenAI."""
        raise NotImplementedError


class Benchmarker:
    """Measures a model folder: load time, TTFT, prefill/decode speed, memory."""

    name: str = ""
    description: str = ""

    def check(self, model_dir: Path) -> str | None:
        return None

    def run(self, model_dir: Path, settings: dict[str, Any], progress: Callable[[str], None]) -> BenchmarkResult:
        raise NotImplementedError
