"""facepq's benchmarks and the process harness they share with the tests.

Not part of the installed package: `facepq bench NAME` runs them from a source
checkout (each module has `main(argv) -> int`), and the tests import `bench.harness`.
"""
