"""Measure: a model folder against its source and the alternatives (quality, gate, benchmarks, reports)."""
