"""The test suite's compilation-cache upkeep (tests/compile_cache.py) against JAX's own LRU cache."""

import warnings

import pytest

from compile_cache import drop_entries_without_access_time
from jax._src import lru_cache


def test_an_entry_left_without_access_time_is_dropped_and_the_cache_takes_writes_again(tmp_path):
  cache = lru_cache.LRUCache(str(tmp_path), max_size=10**6)
  cache.put("whole", b"x" * 10)
  (tmp_path / "killed-cache").write_bytes(b"y" * 10)  # a writer killed before its -atime file
  with pytest.raises(FileNotFoundError):  # JAX's own eviction pass cannot size the cache with it
    cache.put("next", b"z")
  assert drop_entries_without_access_time(tmp_path) == ["killed"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cache.put("next", b"z")
  assert cache.get("next") == b"z" and cache.get("whole") == b"x" * 10
