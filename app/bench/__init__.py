"""Benchmarks that print figures: server costs, client costs, the scale run."""
