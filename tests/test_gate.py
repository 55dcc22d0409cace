"""The gate's own checks can fail: a leak, uneven speed across input lengths, a benchmarker that measures no
memory, a quality under the thresholds. Throwaway benchmarker plugins report what a leaking or uneven model would,
and the real gate (gate.validate, in-process) judges them on a real tiny model."""

import pytest

from slmops.api import Benchmarker
from slmops.config import load_config
from slmops.measure import gate, quality
from slmops.plugin import hookspecs, provided
from slmops.plugin.plugin_manager import plugin_manager

STEADY = {"decode_tok_s": 50.0, "ttft_ms_p50": 10.0, "rss_growth_mb": 0.5, "sweep": [{"decode_tok_s": 50.0}] * 3}
REPORTS = {
    "steady": STEADY,
    "leaky": {**STEADY, "rss_growth_mb": 400.0},
    "uneven": {**STEADY, "sweep": [{"decode_tok_s": 90.0}, {"decode_tok_s": 30.0}]},
    "no-memory": {k: v for k, v in STEADY.items() if k != "rss_growth_mb"},
    # the CPU time a decoded token costs is what the gate judges where a benchmarker reports it
    "costly-at-length": {**STEADY, "sweep": [{"decode_tok_s": 50.0, "decode_cpu_ms_per_token": c} for c in (10, 30)]},
    "loaded": {
        **STEADY,
        "sweep": [{"decode_tok_s": s, "decode_cpu_ms_per_token": 10.0 + s / 100} for s in (90.0, 3.0, 20.0)],
    },
}


class Reporting(Benchmarker):
    def __init__(self, name: str):
        self.name = name

    def run(self, model_dir, settings, progress):
        return {**REPORTS[self.name], "soak_requests": settings["soak_requests"]}


class Plugin:
    @hookspecs.hookimpl
    def register_benchmarkers(self, register):
        for name in REPORTS:
            register(Reporting(name))


@pytest.fixture(scope="module")
def reporting_benchmarkers():
    plugin_manager().register(Plugin(), name="gate-test")
    provided.clear_caches()
    yield
    plugin_manager().unregister(name="gate-test")
    provided.clear_caches()


@pytest.fixture(scope="module")
def measured(tiny_llama_int4):
    from slmops.build import convert

    fp32 = convert.reference(str(tiny_llama_int4.manifest["source"]["checkpoint"]), tiny_llama_int4.options)
    return quality.compare(tiny_llama_int4.path, fp32.path)


def failed(validation) -> list[str]:
    return [c.check for c in validation.failed]


@pytest.mark.parametrize(
    "benchmarker, fails",
    [
        ("steady", []),
        ("leaky", ["no memory leak over the soak"]),
        ("uneven", ["consistent speed across input lengths"]),
        ("no-memory", ["no memory leak over the soak"]),
        ("costly-at-length", ["consistent speed across input lengths"]),
        ("loaded", []),
    ],
)
def test_the_leak_and_speed_checks_fail(reporting_benchmarkers, measured, tiny_llama_int4, benchmarker, fails):
    cfg = load_config(None, search=False)
    cfg.override("validate.max_kld", 100.0, "test")
    cfg.override("validate.min_top1", 0.0, "test")
    result = gate.validate(tiny_llama_int4.path, cfg, measured_quality=measured, benchmarker=benchmarker)
    assert failed(result) == fails and result.ok is (not fails)
    assert result.bench.benchmarker == benchmarker and result.to_json()["ok"] is result.ok


def test_quality_under_the_thresholds_fails_the_gate(reporting_benchmarkers, measured, tiny_llama_int4):
    cfg = load_config(None, search=False)
    cfg.override("validate.max_kld", measured.mean_kld / 2, "test")
    cfg.override("validate.min_top1", 0.0, "test")
    result = gate.validate(tiny_llama_int4.path, cfg, measured_quality=measured, benchmarker="steady")
    assert failed(result) == ["quality: mean KLD"]
    assert not measured.passes(measured.mean_kld / 2, 0.0) and measured.passes(measured.mean_kld, 0.0)
