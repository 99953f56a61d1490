"""Test support shared by the tests and the benchmarks: the namespace lab, origin servers,
small independent proxy clients, an in-process edge+connector (`loopback`), waits on
conditions (`wait`) and Hypothesis strategies that damage valid encodings (`mutate`, needs
the dev dependencies). Not used by ramp itself."""
