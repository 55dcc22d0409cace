"""One ONNX Runtime GenAI session over a model folder: encode, decode, logits, greedy tokens, and generators with
the folder's LoRA adapter switched on. Verification, quality, chat and the benchmarker all run models through it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from slmops.errors import SlmopsError
from slmops.host.cpus import session_threads
from slmops.host.fsutil import write_json_atomic
from slmops.run.adapters import DEFAULT, ActiveAdapter
from slmops.run.structure import Constraint, ConstraintError


def context_length(model_dir: Path) -> int:
    """The longest sequence (prompt and answer) the model folder's genai_config.json allows."""
    genai = json.loads((Path(model_dir) / "genai_config.json").read_text())
    return int(genai["model"].get("context_length") or genai.get("search", {}).get("max_length") or 2048)


def use_every_core(model_dir: Path) -> None:
    """Let ONNX Runtime pick its intra-op thread count (one per physical core) where the genai_config.json sets none.
    ONNX Runtime GenAI 0.18 runs a model with no such setting on one thread, a third slower to decode on 2 cores
    (docs/architecture.md, "The measurements behind the constants"). 0 rather than this machine's count: the folder is deployed elsewhere too."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    decoder = config.get("model", {}).get("decoder")
    if not isinstance(decoder, dict):  # not a decoder this knows: the runtime says what it thinks of the folder
        return
    options = decoder.setdefault("session_options", {})
    if "intra_op_num_threads" not in options:
        options["intra_op_num_threads"] = 0
        write_json_atomic(path, config)


def text_prefix(model_dir: Path) -> list[int]:
    """The tokens the model's tokenizer puts before any text: BOS for Llama 3, Gemma, Mistral; none for Qwen or
    SmolLM2. Read from tokenizer.json's post-processor, which ORT GenAI does not apply."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return []
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    marked, plain = (tokenizer.encode("a", add_special_tokens=special).ids for special in (True, False))
    return marked[: marked.index(plain[0])] if plain and plain[0] in marked else []


class Session:
    """A loaded model. adapter: the adapter to switch on (None: the folder's only one, "none": the base); threads:
    ONNX Runtime's intra-op threads (None: cpus.session_threads(), never more than the CPUs this process may use)."""

    def __init__(self, model_dir: Path, adapter: str | None = None, threads: int | None = None):
        import onnxruntime_genai as og

        self.og = og
        self.model_dir = Path(model_dir)
        start = time.perf_counter()
        try:
            config = og.Config(str(self.model_dir))
            threads = threads if threads is not None else session_threads()
            if threads is not None:
                options = {"intra_op_num_threads": threads}
                config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self.model = og.Model(config)
        except Exception as e:  # the runtime's own message, e.g. a genai_config.json it cannot parse
            raise SlmopsError(
                f"ONNX Runtime GenAI cannot load {self.model_dir}: {' '.join(str(e).split())[:300]}; "
                "build it again with `slmops convert`"
            ) from None
        self.tokenizer = og.Tokenizer(self.model)
        self.adapter = ActiveAdapter(og, self.model, self.model_dir, adapter)  # the model as it is deployed
        self.load_s = time.perf_counter() - start
        self.context_length = context_length(self.model_dir)
        genai = json.loads((self.model_dir / "genai_config.json").read_text())["model"]
        eos = genai.get("eos_token_id", [])
        self.eos_ids = {int(i) for i in (eos if isinstance(eos, list) else [eos])}
        # Sliding-window attention (Gemma 2/3) refuses a KV cache shorter than its window, however short the text.
        window = (genai.get("decoder", {}).get("sliding_window") or {}).get("window_size") or 0
        self.shortest_cache = min(int(window), self.context_length)
        self.prefix = text_prefix(self.model_dir)

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def use_adapter(self, name: str | None) -> None:
        self.adapter = ActiveAdapter(self.og, self.model, self.model_dir, name)

    def encode(self, text: str) -> list[int]:
        """Plain text as the source's tokenizer encodes it: with the BOS it puts first, where it puts one."""
        return self.prefix + self.tokens(text)

    def tokens(self, text: str) -> list[int]:
        """Exactly the text's own tokens, nothing added: for a rendered chat prompt, whose template already wrote
        any BOS (ORT GenAI 0.18's encode adds none, so it is never there twice)."""
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def generator(
        self, max_length: int, constraint: Constraint | None = None, adapter: str | None = DEFAULT, **search: Any
    ) -> Any:
        """An og.Generator for up to max_length tokens (prompt included), adapter on (this session's, or the one
        named; "none": the base); constraint: the structure its tokens must keep to (the runtime's grammar engine
        masks the rest); search: its other options."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max(max_length, self.shortest_cache), **search)
        if constraint is not None:
            params.set_guidance(constraint.kind, constraint.grammar)
        try:
            generator = self.og.Generator(self.model, params)
        except RuntimeError as e:
            if constraint is None:
                raise
            # the grammar engine compiles the constraint here: a schema keyword it does not support fails now
            message = " ".join(str(e).split())[:300]
            raise ConstraintError(
                f"the grammar engine cannot constrain to this schema: {message}; simplify it"
            ) from None
        self.adapter.apply(generator, adapter)
        return Generation(generator, max_length)

    def check_constraint(self, constraint: Constraint) -> None:
        """Refuse, before any answer starts, a constraint the grammar engine cannot compile (~2 ms)."""
        self.generator(2, constraint)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The next-token logits at every position of tokens, [len(tokens), vocab]."""
        generator = self.generator(len(tokens) + 1)
        generator.append_tokens(tokens)
        return np.asarray(generator.get_output("logits"))[0]

    def greedy(self, tokens: list[int], new_tokens: int) -> Iterator[int]:
        """Greedy continuation of tokens, one id at a time, until new_tokens or the end of sequence."""
        generator = self.generator(len(tokens) + new_tokens, do_sample=False)
        generator.append_tokens(tokens)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])


class Generation:
    """An og.Generator that stops at max_length tokens itself: its KV cache may be longer than that (a sliding
    window's minimum), so the runtime's own is_done would let it run on."""

    def __init__(self, generator: Any, max_length: int):
        self.generator = generator
        self.max_length = max_length
        self.length = 0

    def append_tokens(self, tokens: list[int]) -> None:
        self.generator.append_tokens(tokens)
        self.length += len(tokens)

    def generate_next_token(self) -> None:
        self.generator.generate_next_token()
        self.length += 1

    def is_done(self) -> bool:
        return self.length >= self.max_length or self.generator.is_done()

    def __getattr__(self, name: str) -> Any:  # get_output, get_next_tokens, ... as the runtime has them
        return getattr(self.generator, name)
