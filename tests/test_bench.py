"""The benchmarker, quality metrics, the edge-case suite and validate's exit code, on tiny generated models."""

import shutil
from pathlib import Path

import numpy as np

from slmops import convert, edgecases, quality


def test_bench_metrics_are_present_and_consistent(cli, tiny_llama_int4, tmp_path):
    r = cli("bench", tiny_llama_int4["path"], "--runs", "3", "--lengths", "8,64", "--max-new-tokens", "6", "--soak", "3",
            "--report", tmp_path / "rep", "--json")
    assert r.rc == 0, r
    m = r.json()
    for key in ("load_s", "ttft_ms_p50", "decode_tok_s", "latency_ms_p50", "latency_ms_p95", "peak_rss_mb", "cpu_utilisation", "rss_growth_mb"):
        assert isinstance(m[key], float) and m[key] == m[key], key  # present, not NaN
    assert m["latency_ms_p95"] >= m["latency_ms_p50"] > 0 and m["decode_tok_s"] > 0 and 0 < m["cpu_utilisation"] <= 1.0
    assert m["peak_rss_scope"] == "this benchmark"  # not the CLI start-up or an earlier conversion
    assert [s["prompt_tokens"] for s in m["sweep"]] == [8, 64]
    for s in m["sweep"]:
        assert s["generated_tokens"] == 3 * 6 and s["latency_ms_p95"] >= s["latency_ms_p50"]
    assert m["quality"]["mean_kld"] >= 0 and 0 <= m["quality"]["top1_agreement"] <= 1
    assert len(m["edge_cases"]) == len(edgecases.CASES) and all(e["ok"] for e in m["edge_cases"])
    assert (tmp_path / "rep" / "speed.png").stat().st_size > 1000 and "decode tok/s" in (tmp_path / "rep" / "report.md").read_text()


def test_kld_of_a_model_against_its_copy_is_zero(tiny_llama_int4, tmp_path):
    """Two separate loads and runs (a copy, so no path can be short-cut): deterministic CPU inference agrees exactly."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_int4["path"], copy)
    q = quality.compare(copy, Path(tiny_llama_int4["path"]))
    assert abs(q["mean_kld"]) < 1e-12 and q["top1_agreement"] == 1 and q["perplexity"] == q["reference_perplexity"]


def test_damaged_model_scores_worse(tiny_qwen2, tmp_path):
    import onnx
    from onnx import numpy_helper

    fp32 = Path(convert.convert(str(tiny_qwen2), {"precision": "fp32"})["path"])
    int8 = Path(convert.convert(str(tiny_qwen2), {"precision": "int8"})["path"])
    damaged = tmp_path / "damaged"
    shutil.copytree(fp32, damaged)
    model = onnx.load(str(damaged / "model.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(w + rng.normal(0, 3 * float(w.std()), w.shape).astype(np.float32), init.name))
    (damaged / "model.onnx.data").unlink()
    onnx.save(model, str(damaged / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    good, bad = quality.compare(int8, fp32), quality.compare(damaged, fp32)
    assert bad["mean_kld"] > 10 * good["mean_kld"] and bad["top1_agreement"] < good["top1_agreement"]


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
    loose = cli("validate", tiny_llama_int4["path"], "--max-kld", "100", "--min-top1", "0", *common)
    strict = cli("validate", tiny_llama_int4["path"], "--max-kld", "0", *common)
    assert strict.rc == 1 and "validation failed: quality: mean KLD" in strict.err
    checks = {c["check"]: c for c in loose.json()["checks"]}
    assert checks["quality: mean KLD"]["ok"] and checks["edge cases handled"]["ok"]
    assert loose.rc == (0 if all(c["ok"] for c in checks.values()) else 1)
