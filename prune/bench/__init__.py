"""Benchmarks: commands that print measured figures (JSON), never tests."""
