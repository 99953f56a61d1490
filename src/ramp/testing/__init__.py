"""Test support shared by the integration tests and the benchmarks: the namespace lab,
origin servers, and small independent proxy clients. Not used by ramp itself."""
