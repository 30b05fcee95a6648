"""Benchmark-side helpers shared by the decode benchmarks (never imported by
the library): synthetic decode states and selections of a given locality."""
