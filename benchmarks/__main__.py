"""`python -m benchmarks NAME [flags]` from the repository root: the same as `mb2po-bench NAME [flags]`."""
from benchmarks import run

run()
