"""The benchmarker, quality metrics, the edge-case suite and validate's exit code, on tiny generated models."""

import shutil

import numpy as np

from slmops.build import convert
from slmops.measure import bench, edgecases, quality
from slmops.measure.bench import SUMMARY_KEYS

from .conftest import run_cli


def test_bench_metrics_are_present_and_consistent(cli, tiny_llama_int4, tmp_path):
    r = cli(
        "bench",
        tiny_llama_int4.path,
        "--runs",
        "3",
        "--lengths",
        "8,64",
        "--max-new-tokens",
        "6",
        "--soak",
        "3",
        "--report",
        tmp_path / "rep",
        "--json",
    )
    assert r.rc == 0, r
    m = r.json()
    for key in SUMMARY_KEYS:
        assert isinstance(m[key], float) and m[key] == m[key], key  # present, not NaN
    assert m["latency_ms_p95"] >= m["latency_ms_p50"] > 0 and m["decode_tok_s"] > 0 and 0 < m["cpu_utilisation"] <= 1.0
    assert m["peak_rss_scope"] == "this benchmark"  # not the CLI start-up or an earlier conversion
    assert [s["prompt_tokens"] for s in m["sweep"]] == [8, 64]
    for s in m["sweep"]:
        assert s["generated_tokens"] == 3 * 6 and s["latency_ms_p95"] >= s["latency_ms_p50"]
    assert m["quality"]["positions"] > 0 and 0 <= m["quality"]["top1_agreement"] <= 1
    assert len(m["edge_cases"]) == len(edgecases.CASES) and all(e["ok"] for e in m["edge_cases"])
    assert (tmp_path / "rep" / "speed.png").stat().st_size > 1000 and "decode tok/s" in (
        tmp_path / "rep" / "report.md"
    ).read_text()


def test_kld_of_a_model_against_its_copy_is_zero(tiny_llama_int4, tmp_path):
    """Two separate loads and runs (a copy, so no path can be short-cut): deterministic CPU inference agrees exactly."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_int4.path, copy)
    q = quality.compare(copy, tiny_llama_int4.path)
    assert abs(q.mean_kld) < 1e-12 and q.top1_agreement == 1 and q.perplexity == q.reference_perplexity


def test_damaged_model_scores_worse(tiny_qwen2, tmp_path):
    import onnx
    from onnx import numpy_helper

    fp32 = convert.convert(str(tiny_qwen2), {"precision": "fp32"}).path
    int8 = convert.convert(str(tiny_qwen2), {"precision": "int8"}).path
    damaged = tmp_path / "damaged"
    shutil.copytree(fp32, damaged)
    model = onnx.load(str(damaged / "model.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32:
            init.CopyFrom(
                numpy_helper.from_array(w + rng.normal(0, 3 * float(w.std()), w.shape).astype(np.float32), init.name)
            )
    (damaged / "model.onnx.data").unlink()
    onnx.save(model, str(damaged / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    good, bad = quality.compare(int8, fp32), quality.compare(damaged, fp32)
    assert bad.mean_kld > 10 * good.mean_kld and bad.top1_agreement < good.top1_agreement
    assert bad.mean_delta_p < good.mean_delta_p and bad.kld_p99 > good.kld_p99
    # the default gate refuses the damaged build
    common = ["--runs", "1", "--lengths", "8,32", "--max-new-tokens", "4", "--soak", "2", "--json"]
    refused = run_cli("validate", damaged, "--reference", fp32, *common)
    assert refused.rc == 1 and "quality: mean KLD" in refused.err, refused


def test_corpus_metrics_on_a_tiny_model(tiny_llama_int4, monkeypatch):
    """The shipped corpus, whole: every text cut into 512-token windows, the second half of each scored."""
    monkeypatch.delenv("SLMOPS_QUALITY_SET")
    rows = quality.load_set()
    assert {r["kind"] for r in rows} == {"prose", "code", "dialogue"}
    fp32 = convert.convert(tiny_llama_int4.manifest["source"]["checkpoint"], {"precision": "fp32"}).path
    from slmops.run.runtime import Session

    session = Session(fp32)
    encode = session.tokens
    tokens = sum(len(encode(r["text"])) for r in rows)
    q = quality.compare(tiny_llama_int4.path, fp32)
    assert q.window == 511  # the tiny model's context is 512: a window and the next token fit in it
    expected = sum(
        len(w) - len(w) // 2 - 1 for r in rows for w in quality.windows(encode(r["text"]), 511, session.prefix)
    )
    assert tokens >= 20_000 and expected > 10_000
    assert q.positions == expected and q.corpus == quality.corpus_id()
    assert q.kld_p99 > q.mean_kld > 0 and q.reference_perplexity > 1
    assert abs(q.mean_delta_p) < 0.5


def test_edge_case_suite_reports_a_crash_instead_of_raising():
    class CrashOnEmpty:
        context_length = 64

        def stream(self, messages, options, usage):
            if not messages[-1]["content"]:
                raise RuntimeError("native code fell over")
            usage.update(prompt_tokens=3, completion_tokens=1)
            yield "ok"

    rows = {r["case"]: r for r in edgecases.run_suite(CrashOnEmpty())}
    assert rows["empty prompt"]["ok"] is False and "native code fell over" in rows["empty prompt"]["what"]
    assert rows["whitespace only"]["ok"] is True


def test_validate_exit_code_follows_thresholds(cli, tiny_llama_int4):
    common = ["--runs", "1", "--lengths", "8,32", "--max-new-tokens", "4", "--soak", "2", "--json"]
    loose = cli("validate", tiny_llama_int4.path, "--max-kld", "100", "--min-top1", "0", *common)
    strict = cli("validate", tiny_llama_int4.path, "--max-kld", "0", *common)
    assert strict.rc == 1 and "validation failed: quality: mean KLD" in strict.err
    checks = {c["check"]: c for c in loose.json()["checks"]}
    assert checks["quality: mean KLD"]["ok"] and checks["edge cases handled"]["ok"]
    assert loose.rc == (0 if all(c["ok"] for c in checks.values()) else 1)


def test_compare_recommends_the_smallest_build_that_passes(tiny_llama):
    # Measured once with a loose gate; then a gate between int8's KLD and the best int4's must pick int8, and a gate
    # nothing passes says so instead of calling fp32 "within" it.
    settings = {"runs": 1, "max_new_tokens": 4, "lengths": [8], "soak_requests": 0}
    measured, skipped = bench.measure_precisions(str(tiny_llama), {}, settings)
    loose = bench.recommend(measured, skipped, {"max_kld": 100.0, "min_top1": 0.0})
    rows = {r["build"]: r for r in loose["rows"]}
    assert set(rows) == {
        "fp32",
        "int8",
        "int4 gptq",
        "int4 gptq, Q5_K_M bytes",
        "int4 imatrix",
        "int4 rtn sym",
        "int4 rtn sym block 16",
        "int4 rtn_last asym",
    }
    assert loose["recommendation"] == min(rows.values(), key=lambda r: r["size_mb"])["build"]
    assert loose["recommendation"].startswith("int4") and "is the smallest build within" in loose["why"]
    best_int4 = min(r["mean_kld"] for name, r in rows.items() if name.startswith("int4"))
    assert rows["int8"]["mean_kld"] < best_int4
    between = {"max_kld": (rows["int8"]["mean_kld"] + best_int4) / 2, "min_top1": 0.0}
    middle = bench.recommend(measured, skipped, between)
    assert middle["recommendation"] == "int8"
    assert {r["build"] for r in middle["rows"] if r["passes"]} == {"int8", "fp32"}
    none = bench.recommend(measured, skipped, {"max_kld": 100.0, "min_top1": 1.1})
    assert none["recommendation"] == "fp32" and none["why"].startswith("no build is within")
