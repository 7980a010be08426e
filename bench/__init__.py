"""Benchmarks: stepwise against its limits (python -m bench). Never imported by serving/."""
