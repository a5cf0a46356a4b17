"""Model builders for tests and benchmarks (installed as ``fxprune.models_zoo``)."""
