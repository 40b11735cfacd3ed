"""Benchmark suites behind `python -m jobs.benchmark`; each returns a `common.SuiteResult`."""
