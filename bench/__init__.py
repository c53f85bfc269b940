"""Benchmarks (GPU): named shape presets, results as JSON in `bench/results/`. Not tests."""
