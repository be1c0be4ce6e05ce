"""Upkeep of the persistent compilation cache the tests share.

JAX's LRU cache (on when JAX_COMPILATION_CACHE_MAX_SIZE is set, as `make test` does) writes each entry as two files,
`<key>-cache` and then `<key>-atime`. A process killed between the two (the SIGKILL tests kill workers that may be
compiling) leaves an entry without its access time, and from then on every write to the cache fails while JAX sizes
the cache for eviction ("Error writing persistent compilation cache entry ... -atime"): nothing new is cached and
every later run compiles those programs again.
"""

import pathlib

_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"


def drop_entries_without_access_time(cache_dir) -> list[str]:
  """Removes the `-cache` files that have no `-atime` file, under the cache's own lock; returns their keys."""
  path = pathlib.Path(cache_dir)
  if not path.is_dir():
    return []
  try:
    import filelock
  except ImportError:  # without filelock JAX runs the cache without eviction, which never reads access times
    return []
  dropped = []
  with filelock.FileLock(str(path / ".lockfile"), timeout=120):  # the lock JAX holds while it writes an entry
    for entry in path.glob(f"*{_CACHE_SUFFIX}"):
      key = entry.name[:-len(_CACHE_SUFFIX)]
      if not (path / f"{key}{_ATIME_SUFFIX}").exists():
        entry.unlink(missing_ok=True)
        dropped.append(key)
  return dropped
