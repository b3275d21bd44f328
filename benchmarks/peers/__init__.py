"""Independent peer implementations that the benchmarks compare fastland with."""
