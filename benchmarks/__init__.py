"""Kernel microbenchmarks and trainer throughput. Run ``python -m benchmarks --list``."""
