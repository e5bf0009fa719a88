"""Benchmarks (not tests): scripts that print numbers and write results files."""
