"""One base, many adapters (issue 32): `slmops register --adapter` / `slmops adapters add` keep one base folder and
one adapter file per fine-tune, each measured against its merged source; an adapter that does not fit the base is
refused; `slmops serve` answers BASE:ADAPTER per request on the one loaded base (concurrent requests on different
adapters each get that adapter's answer), and an adapter added while serving is served without a restart."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import pytest

from slmops.build import convert

from .test_convert import lora_adapter  # noqa: F401 (the fixture: the base's first LoRA, "support-bot")
from .test_serve import Served

PROMPTS = ["Hi", "Tell me about ships.", "What is two plus two?", "Name a colour."]


def lora(tiny_llama: Path, out: Path, seed: int, modules: list[str]) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=32, target_modules=modules, init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_with_adapters(tiny_llama, lora_adapter, tmp_path_factory, cli) -> dict:  # noqa: F811
    tmp = tmp_path_factory.mktemp("adapters")
    registry = tmp / "registry"
    env = {"SLMOPS_REGISTRY_DIR": str(registry)}
    base = convert.convert(str(tiny_llama), {"precision": "int4", "adapter": lora_adapter, "adapter_mode": "adapter"})
    sales = lora(tiny_llama, tmp / "sales", 5, ["q_proj", "v_proj", "down_proj"])
    r = cli("register", base.path, "--name", "base", "--adapter", f"sales={sales}", "--json", env=env)
    assert r.rc == 0, r
    return {"env": env, "registered": r.json(), "tmp": tmp, "registry": registry}


def test_adapters_are_added_measured_and_refused_when_they_do_not_fit(base_with_adapters, tiny_llama, cli):
    env, tmp = base_with_adapters["env"], base_with_adapters["tmp"]
    (row,) = base_with_adapters["registered"]["adapters"]
    assert row["adapter"] == "sales" and row["positions"] > 0 and row["top1_agreement"] > 0.5
    folder = Path(base_with_adapters["registered"]["entry"]["path"])
    assert sorted(p.name for p in (folder / "adapters").glob("*.onnx_adapter")) == [
        "sales.onnx_adapter",
        "support-bot.onnx_adapter",
    ]
    # a LoRA on other modules needs another base graph: refused, nothing written
    other = lora(tiny_llama, tmp / "other", 6, ["q_proj"])
    bad = cli("adapters", "add", "base", f"other={other}", env=env)
    assert bad.rc == 1 and "does not fit base" in bad.err and "Traceback" not in bad.err, bad
    assert not (folder / "adapters" / "other.onnx_adapter").exists()
    listed = cli("adapters", "ls", "base", "--json", env=env).json()["adapters"]
    assert [a["model"] for a in listed] == ["base:sales", "base:support-bot"]
    assert listed[0]["mean_kld"] == row["mean_kld"]
    # still runnable: the registered folder's record includes the adapter it gained
    run = cli("model", "run", "base:sales", "-p", "Hi", "--max-new-tokens", "4", "--json", env=env)
    assert run.rc == 0 and run.json()["adapter"] == "sales", run


def test_serve_switches_adapters_per_request(base_with_adapters, tiny_llama, cli):
    env = {**os.environ, **base_with_adapters["env"]}
    served = Served("base", "--parallel", "2", env=env)
    try:
        client = served.client()
        listed = sorted(m.id for m in client.models.list().data)
        assert listed == ["base", "base:sales", "base:support-bot"]

        def ask(model: str, prompt: str) -> str:
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
            )
            assert answer.model == model
            return answer.choices[0].message.content

        names = ["base:sales", "base:support-bot", "base:none"]
        alone = {(m, p): ask(m, p) for m in names for p in PROMPTS}
        assert len({alone[(m, PROMPTS[1])] for m in names}) == 3  # each adapter answers its own way
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            together = dict(zip(alone, pool.map(lambda k: ask(*k), list(alone) * 1), strict=True))
        assert together == alone

        # added while serving: answered without a restart
        late = lora(tiny_llama, base_with_adapters["tmp"] / "late", 7, ["q_proj", "v_proj", "down_proj"])
        assert cli("adapters", "add", "base", f"late={late}", env=base_with_adapters["env"]).rc == 0
        assert "base:late" in {m.id for m in client.models.list().data}
        assert ask("base:late", PROMPTS[1]) not in {alone[(m, PROMPTS[1])] for m in names}
        status, body = served.raw(
            "POST", "/v1/chat/completions", '{"model": "base:nope", "messages": [{"role": "user", "content": "x"}]}'
        )
        assert status == 404 and "has no adapter 'nope'" in body["error"]["message"]
    finally:
        served.stop()
