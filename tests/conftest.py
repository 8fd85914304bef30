import os

# Tests run on the CPU, single-threaded XLA compilation is not required but keep memory modest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
