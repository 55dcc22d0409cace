"""Tokens as the model expects them: the deployed runtime is fed what the source's tokenizer and chat template
produce, BOS included where the tokenizer adds it and never twice (quality scoring, the source check, model run),
and a base model without a chat template gets its family's, so Foundry Local chats with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from slmops import templates
from slmops.build import convert
from slmops.measure import quality
from slmops.run.runtime import Session

BOS = 0  # <|endoftext|>, which the tiny_llama_bos tokenizer puts before every text


@pytest.fixture(scope="module")
def bos_build(tiny_llama_bos) -> dict:
    return convert.convert(str(tiny_llama_bos), {"precision": "fp32"})


def test_plain_text_gets_the_source_tokenizers_bos_once(bos_build, tiny_llama_bos):
    source, session = AutoTokenizer.from_pretrained(tiny_llama_bos), Session(bos_build.path)
    rows = [r["text"] for r in quality.load_set(None, shipped=True) if "text" in r]
    assert session.prefix == [BOS]
    assert all(session.encode(text) == source(text).input_ids for text in rows)  # the whole corpus, BOS and all
    # convert's own comparison with the source found the same
    assert bos_build.verification["source"]["first_token_difference"] is None


def test_quality_windows_each_open_with_the_bos(bos_build):
    session = Session(bos_build.path)
    text = quality.load_set(None, shipped=True)[0]["text"]
    windows = quality.windows(session.tokens(text), 128, session.prefix)
    assert len(windows) > 2 and all(w[0] == BOS and w.count(BOS) == 1 and len(w) <= 128 for w in windows)
    assert sum(len(w) - 1 for w in windows) == len(session.tokens(text))  # every token of the text, once
    q = quality.compare(bos_build.path, bos_build.path)
    assert q.corpus == quality.corpus_id(prefix=[BOS]) != quality.corpus_id()


def test_chat_prompts_carry_the_templates_bos_and_no_second_one(bos_build, tiny_llama_bos):
    build = bos_build.path
    chosen = templates.choose(build)
    assert chosen.family.bos == "<|endoftext|>"  # derived from the template, which writes it
    source, session = AutoTokenizer.from_pretrained(tiny_llama_bos), Session(build)
    for conv in templates.CONVERSATIONS.values():
        theirs = source.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
        ours = session.tokens(templates.render(chosen.family, conv, chosen.default_system))
        assert ours == list(theirs) and ours.count(BOS) == 1
    check = templates.fidelity(build, chosen)
    assert check["checked"] and check["ok"] and check["tokenized_by"] == "ORT GenAI", check


@pytest.mark.parametrize("engine", ["registry", "ort-genai"])
def test_model_run_feeds_the_tokens_the_chat_template_makes(cli, registry_dir, bos_build, tiny_llama_bos, engine):
    assert cli("register", bos_build.path, "--name", "bos").rc == 0
    question = "What is the capital of France?"
    r = cli("model", "run", "bos", "--prompt", question, "--engine", engine, "--max-new-tokens", "2", "--json")
    assert r.rc == 0, r
    expected = AutoTokenizer.from_pretrained(tiny_llama_bos).apply_chat_template(
        [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert r.json()["prompt_tokens"] == len(expected)


def test_a_bos_only_the_source_tokenizer_knows_is_caught_by_the_tokens(tmp_path, default_checkpoint):
    # The text matches the model's template byte for byte, but "<bos>" is a special token only in
    # tokenizer_config.json: transformers reads it as one token, the runtime as plain text pieces. (A model of its
    # own: test_templates adds "<bos>" to the shared fixture's tokenizer.json.)
    from tests.conftest import build_tiny
    from tests.test_templates import REAL_TEMPLATES

    path = build_tiny(tmp_path / "gemma-like", default_checkpoint, "llama", REAL_TEMPLATES["gemma"][0])
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<bos>"}))
    assert "<bos>" not in (path / "tokenizer.json").read_text()
    check = templates.fidelity(path, templates.choose(path))
    assert check["checked"] and not check["ok"]
    assert all("first_diff_char" not in r and r["first_diff_token"] == 0 for r in check["conversations"]), check


def test_a_template_that_takes_no_conversation_is_not_checked(tiny_model_factory):
    path = tiny_model_factory("{{ raise_exception('this template takes no conversation') }}")
    check = templates.fidelity(path, templates.choose(path, "chatml"))
    assert check["checked"] is False and "none of the test conversations" in check["reason"]
    assert all("skipped" in r for r in check["conversations"])


@pytest.mark.parametrize("family", ["chatml", "phi3", "phi4", "llama3", "gemma", "mistral"])
@pytest.mark.parametrize("default_system", [None, "Be brief.\nQuote 'this' \\ é"])
def test_the_written_chat_template_renders_as_slmops_does(family, default_system):
    fam = templates.family_by_name(family)
    source = templates.chat_template(fam, default_system)
    conversations = [
        *templates.CONVERSATIONS.values(),
        [],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    for conv in conversations:
        for generation in (True, False):
            written = templates.rendering._jinja_template(source).render(
                messages=conv, add_generation_prompt=generation
            )
            assert written == templates.render(fam, conv, default_system, generation)


def test_a_base_model_gets_a_chat_template_and_foundry_local_chats(cli, registry_dir, tiny_model_factory):
    # A qwen2 base model: no chat template, ChatML's tokens in its vocabulary. Detected on the converted folder
    # (genai_config.json's model type); Foundry Local refused it before ("Empty chat template.").
    source = tiny_model_factory(None, "qwen2")
    build = convert.convert(str(source), {"precision": "fp32"}).path
    assert not (build / "chat_template.jinja").exists() and not (build / "config.json").exists()
    chosen = templates.choose(build)
    assert (chosen.family.name, chosen.how) == ("chatml", "detected")
    r = cli("register", build, "--name", "base", "--json")
    assert r.rc == 0, r
    fidelity = r.json()["template"]["fidelity"]
    assert fidelity["checked"] is False and fidelity["written"]["family"] == "chatml"
    folder = Path(r.json()["entry"]["path"])
    assert (folder / "chat_template.jinja").is_file() and not (build / "chat_template.jinja").exists()
    question = "What is the capital of France?"
    r = cli("model", "run", "base", "--prompt", question, "--engine", "registry", "--max-new-tokens", "3", "--json")
    assert r.rc == 0, r
    rendered = templates.render(chosen.family, [{"role": "user", "content": question}])
    assert r.json()["prompt_tokens"] == len(templates.count_tokens(folder, rendered))
    assert templates.runtime_render(folder, [{"role": "user", "content": question}]) == rendered
