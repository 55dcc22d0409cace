"""The fine-tuned float source the int4 for float checkpoints is measured on (benchmarks/float_sources.py), at tiny
size: the shipped domain set is what its generator makes, the fine-tune trains (its loss falls, its weights move off
the source's), and its held-out rows are scored on its int4 build and on the source through the product's path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import float_sources
from slmops.build import convert
from slmops.measure import bench

from .conftest import build_tiny

make_domain = float_sources.make_domain


def test_the_shipped_domain_set_is_what_the_generator_makes():
    train, held_out = make_domain.make()
    assert make_domain.read(make_domain.TRAIN) == train and make_domain.read(make_domain.EVAL) == held_out
    assert len(train) == make_domain.TRAIN_ROWS and len(held_out) == make_domain.EVAL_ROWS
    # held out for real: no customer of the evaluation rows is in the training rows
    assert not {r["expected"]["customer"] for r in held_out} & {r["expected"]["customer"] for r in train}
    for r in train + held_out:
        assert set(r["expected"]) == set(r["schema"]["required"]) and str(r["expected"]["order_id"]) in r["prompt"]


@pytest.fixture(scope="module")
def tiny_finetune(tmp_path_factory, default_checkpoint):
    source = build_tiny(tmp_path_factory.mktemp("ft") / "source", default_checkpoint, "llama")
    out = tmp_path_factory.mktemp("ft") / "finetuned"
    rows = make_domain.read(make_domain.TRAIN)[:32]
    result = float_sources.finetune(source, out, rows, steps=12, batch=4, learning_rate=3e-2)
    return source, out, result


def test_the_tiny_finetune_trains(tiny_finetune):
    from safetensors.numpy import load_file

    source, out, result = tiny_finetune
    losses = result["losses"]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    moved = [n for n in before if not np.array_equal(before[n], after[n])]
    assert len(moved) == len(before) and all(after[n].dtype == np.float32 for n in after)
    assert json.loads((out / "slmops-finetune.json").read_text())["steps"] == 12
    assert (out / "tokenizer.json").is_file() and not out.with_name(out.name + ".tmp").exists()


def test_the_finetunes_held_out_rows_are_scored_on_its_int4_and_its_source(tiny_finetune, tmp_path):
    _, out, _ = tiny_finetune
    build = convert.convert(str(out), {"precision": "int4"})
    assert build.manifest["quantizer"] == "gptq"  # a float source takes the float route by default
    domain = tmp_path / "held-out.jsonl"
    domain.write_text("".join(json.dumps(r) + "\n" for r in make_domain.read(make_domain.EVAL)[:3]))
    reference = convert.convert(str(out), {"precision": "fp32"}).path
    scored = bench.domain_scores(build.path, reference, domain)
    assert scored["rows"] == 3 and scored["source"]["rows"] == 3
    for r in scored["results"]:
        assert r["expected"]["order_id"] > 0 and 0 <= r["fields"] <= 1 and isinstance(r["valid"], bool)
    assert 0 <= scored["accuracy"] <= 1 and 0 <= scored["source"]["fields"] <= 1
