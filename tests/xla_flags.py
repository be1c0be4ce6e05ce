"""XLA flags for the test processes and the subprocesses they start (imported by conftest.py and the workers).

Tests run tiny models, so on a small CPU their time goes to compiling, and most of an XLA:CPU compile is LLVM
optimising the generated machine code. Level 0 skips that: XLA's programs, fusions and float semantics are the
same, only the machine code is less tuned (the suite runs about a third faster). Speed is measured by
`benchmarks/`, which keep XLA's defaults.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
  """The XLA_FLAGS value for a test process, with `devices` simulated CPU devices if given."""
  return FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
