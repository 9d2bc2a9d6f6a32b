"""Benchmarks of the crawler-kernels ops against the ways people run them today, as pytest-benchmark tests.

Run from the repository root: `pytest bench` (every case skips without a CUDA device), `pytest bench
--benchmark-json=bench.json` for the machine-readable record, `python -m bench.results --json
bench.json` to write its rows into bench/RESULTS.md, `python -m bench.gpu_check` (= `make gpu-check`)
for the whole GPU validation within a time budget. docs/benchmarks.md describes each benchmark.
"""
