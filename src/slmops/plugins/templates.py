"""Template provider: the common small-model families. Each field is a whole turn, separators included."""

from slmops.api import CHAT_DEFAULTS, TemplateFamily, ToolSyntax, hookimpl

# Llama 3.1-3.3's JSON tool calls: a bare {"name": ..., "parameters": {...}}, tools described in the system turn and
# results read back (Meta's template puts results in an "ipython" turn; here a user turn, which every family has).
LLAMA3_TOOLS = ToolSyntax(
    call_start="",
    call_end="",
    arguments_key="parameters",
    instructions=(
        "You have access to the following functions. To call a function, respond with JSON for a function call, in"
        ' the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        " Do not use variables.\n\n{Tools}"
    ),
    result="Function result: {Content}",
)

# Each call-as-a-JSON-array family (the calls of a turn in one array): what its models write and read, for prompts
# slmops writes itself (where the model's own template takes tools, that template writes the prompt).
MISTRAL_TOOLS = ToolSyntax(
    call_start="[TOOL_CALLS] ",
    call_end="",
    instructions="[AVAILABLE_TOOLS] {Tools}[/AVAILABLE_TOOLS]",
    result="[TOOL_RESULTS] {Content}[/TOOL_RESULTS]",
    in_list=True,
)
PHI4_MINI_TOOLS = ToolSyntax(
    call_start="functools",
    call_end="",
    instructions="<|tool|>{Tools}<|/tool|>",
    result="Function result: {Content}",
    in_list=True,
)
GRANITE_TOOLS = ToolSyntax(
    call_start="<|tool_call|>",
    call_end="",
    instructions=(
        "You are a helpful assistant with access to the following function calls. To call them, answer with "
        '<|tool_call|> and a JSON list of {"name": ..., "arguments": {...}} objects.\n{Tools}'
    ),
    result="Function result: {Content}",
    in_list=True,
)

FAMILIES = [
    TemplateFamily(
        name="chatml",
        description="Qwen/ChatML: Qwen2, Qwen2.5, Qwen3, SmolLM, Hermes",
        system="<|im_start|>system\n{Content}<|im_end|>\n",
        user="<|im_start|>user\n{Content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{Content}<|im_end|>\n",
        prompt="<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n",
        stop=["<|im_end|>", "<|endoftext|>"],
        model_config=CHAT_DEFAULTS,
        model_types=("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"),
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    TemplateFamily(
        name="phi3",
        description="Phi-3, Phi-3.5, Phi-4-mini (its functools[...] tool calls)",
        system="<|system|>\n{Content}<|end|>\n",
        user="<|user|>\n{Content}<|end|>\n",
        assistant="<|assistant|>\n{Content}<|end|>\n",
        prompt="<|user|>\n{Content}<|end|>\n<|assistant|>\n",
        stop=["<|end|>", "<|endoftext|>"],
        model_config={**CHAT_DEFAULTS, "max_length": 4096, "temperature": 0.6},
        model_types=("phi3",),
        markers=("<|user|>", "<|end|>", "<|assistant|>"),
        tools=PHI4_MINI_TOOLS,
    ),
    TemplateFamily(
        name="phi4",
        description="Phi-4 (ChatML with <|im_sep|>)",
        system="<|im_start|>system<|im_sep|>{Content}<|im_end|>",
        user="<|im_start|>user<|im_sep|>{Content}<|im_end|>",
        assistant="<|im_start|>assistant<|im_sep|>{Content}<|im_end|>",
        prompt="<|im_start|>user<|im_sep|>{Content}<|im_end|><|im_start|>assistant<|im_sep|>",
        stop=["<|im_end|>", "<|endoftext|>"],
        model_config={**CHAT_DEFAULTS, "max_length": 4096},
        model_types=(),
        markers=("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    ),
    TemplateFamily(
        name="llama3",
        description="Llama 3, 3.1, 3.2, 3.3",
        bos="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{Content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{Content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{Content}<|eot_id|>",
        prompt="<|start_header_id|>user<|end_header_id|>\n\n{Content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        stop=["<|eot_id|>", "<|end_of_text|>"],
        model_config={**CHAT_DEFAULTS, "temperature": 0.6},
        model_types=("llama",),
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        tools=LLAMA3_TOOLS,
    ),
    TemplateFamily(
        name="gemma",
        description="Gemma 2, Gemma 3 (no system role: the system text opens the first user turn)",
        bos="<bos>",
        system="<start_of_turn>user\n{Content}\n\n",
        user="<start_of_turn>user\n{Content}<end_of_turn>\n",
        assistant="<start_of_turn>model\n{Content}<end_of_turn>\n",
        prompt="<start_of_turn>user\n{Content}<end_of_turn>\n<start_of_turn>model\n",
        stop=["<end_of_turn>", "<eos>"],
        model_config={
            **CHAT_DEFAULTS,
            "max_length": 8192,
            "temperature": 1.0,
            "top_p": 0.95,
            "repetition_penalty": 1.0,
        },
        system_in_first_user="{System}\n\n{Content}",
        model_types=("gemma", "gemma2", "gemma3", "gemma3_text"),
        markers=("<start_of_turn>", "<end_of_turn>"),
    ),
    TemplateFamily(
        name="mistral",
        description="Mistral 7B Instruct and Mistral-format fine-tunes ([INST] ... [/INST])",
        bos="<s>",
        system="[INST] {Content}\n\n",
        user="[INST] {Content} [/INST]",
        assistant="{Content}</s>",
        prompt="[INST] {Content} [/INST]",
        stop=["</s>"],
        model_config={**CHAT_DEFAULTS, "temperature": 0.7, "repetition_penalty": 1.0},
        system_in_first_user="{System}\n\n{Content}",
        model_types=("mistral",),
        markers=("[INST]", "[/INST]"),
        tools=MISTRAL_TOOLS,
    ),
    TemplateFamily(
        name="granite",
        description="IBM Granite 3.x (<|start_of_role|> turns, <|tool_call|>[...] tool calls)",
        system="<|start_of_role|>system<|end_of_role|>{Content}<|end_of_text|>\n",
        user="<|start_of_role|>user<|end_of_role|>{Content}<|end_of_text|>\n",
        assistant="<|start_of_role|>assistant<|end_of_role|>{Content}<|end_of_text|>\n",
        prompt="<|start_of_role|>user<|end_of_role|>{Content}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
        stop=["<|end_of_text|>"],
        model_config={**CHAT_DEFAULTS, "max_length": 4096},
        model_types=("granite",),
        markers=("<|start_of_role|>", "<|end_of_role|>"),
        tools=GRANITE_TOOLS,
    ),
]


@hookimpl
def register_template_families(register):
    for family in FAMILIES:
        register(family)
