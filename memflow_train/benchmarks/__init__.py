"""Benchmark commands (python -m memflow_train.benchmarks.<name> --help). They print tables and write JSON."""
