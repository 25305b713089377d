"""Benchmarks of fruits-pipeline: ratios against a baseline measured in the same run."""
