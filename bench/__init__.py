"""Benchmarks of latentforge (issue 5): `make bench` runs them all through `bench.run_all`.

Every figure is a ratio of two things measured side by side in the same run on the same machine, so the
figures survive a change of machine better than absolute numbers do. Each benchmark is a module with a
`run(size, workdir) -> dict` function and a command line (`python -m bench.<name> --size smoke|full`);
`size="smoke"` runs it at toy sizes for `tests/test_bench_smoke.py`.
"""
