"""Plain-PyTorch references of every kernel; tests and benchmarks both import them."""
