"""Benchmarks: stepwise against its limits (python -m bench); the measurements run on
their own (python -m bench.memory_burst, .decode_peaks, .ab_servers, .fair_admission);
and bench.harness, which tests, benchmarks and deploy/ start servers and read memory
with. Never imported by serving/."""
