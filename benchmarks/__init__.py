"""pytest-benchmark suites of the CGC ops (run: ``pytest benchmarks/ --benchmark-only``)."""
