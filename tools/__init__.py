"""Accuracy checks, benchmarks, demo and sample data."""
