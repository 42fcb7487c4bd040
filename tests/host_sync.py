"""The operators that make the host wait for the accelerator, for tests/test_trainer.py's host-sync test and
benchmarks/bench_model.py's dispatch counts. They are a testing and benchmarking concern, so they live beside the
tests (on pytest's `pythonpath`; the benchmark imports this file as `tests.host_sync`), not in the package."""

__all__ = ["HOST_SYNC_OPERATORS"]

# Reading a value (`.item()`, `bool(tensor)`) or an output whose size depends on the data. The train step must not
# call them outside logging.
HOST_SYNC_OPERATORS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "repeat_interleave"}
)
