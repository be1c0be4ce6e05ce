"""Test-wide set-up: 8 simulated CPU devices and fast compiles (before JAX is imported), the persistent
compilation cache."""

import os

from compile_cache import drop_entries_without_access_time
from xla_flags import xla_flags

def _shared_cache_dir() -> str:
  """The Makefile's cache, so a plain `pytest` reuses what `make test` compiled: $XDG_CACHE_HOME (or ~/.cache)
  /phi_jax/jax, or the repository's .cache/jax without a home directory."""
  home = os.environ.get("HOME")
  if not home:
    return os.path.join(os.path.dirname(__file__), "..", ".cache", "jax")
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "phi_jax", "jax")


os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _shared_cache_dir())  # subprocess tests inherit it
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", "1000000000")  # as the Makefile: 1 GB, LRU eviction
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(devices=8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] or _shared_cache_dir()
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
drop_entries_without_access_time(_CACHE)


@pytest.fixture(autouse=True)
def _cache_stays_writable():
  """After each test: a subprocess it killed mid-compile must not leave the cache unwritable (compile_cache.py)."""
  yield
  drop_entries_without_access_time(_CACHE)

@pytest.fixture(scope="session")
def tiny_config():
  from phi_jax.model import presets
  return presets["tiny"]
