"""Benchmarks and stress runs of the plugin daemon."""
