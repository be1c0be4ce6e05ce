"""Answer verification with math-verify in a pool of worker processes, each answer under a hard wall-clock limit.

    pool = VerifierPool(VerifierConfig(num_workers=8, timeout_s=4.0))
    rewards = pool.verify_batch(completions, golds)        # list[bool], one per completion
    pool.shutdown()

or, through a lazily started module-wide pool: `is_correct(completion, gold)`, `verify_batch(completions, golds)`,
`shutdown()`.

Why processes: math-verify's timeouts use `signal.alarm` (main thread only), sympy can hang inside C code, and
model output is untrusted. Each worker is a fresh interpreter running `verify_worker.py` (started with
`subprocess`, i.e. fork+exec: nothing of a parent that has imported JAX, with its threads, is inherited, and
unlike multiprocessing's spawn no `__main__` is re-imported). A worker that overruns its limit is killed and
replaced; a timeout, a crash or a dead worker counts as "incorrect"; the caller never hangs and never sees the
error. Answers are extracted and screened here first (see `extract`, `screen`), so a worker only ever sees two
short strings and parses them with math-verify's LaTeX parser and its digits-and-operators-only expression path
(which is the only place it calls sympy's `parse_expr`; nothing else reaches eval).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

from phi_jax.rewards.extract import choice_letter, extract_answer, extract_gold
from phi_jax.rewards.screen import ScreenConfig, screen_problem
from phi_jax.rewards.think_format import ThinkFormat
# The worker script imports only the standard library and math-verify, so its number rule is shared from there.
from phi_jax.rewards.verify_worker import NUMBER_RELATIVE_TOLERANCE, numbers_match, plain_number  # noqa: F401

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verify_worker.py")
_READ_CHUNK = 1 << 16

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
  """How answers are checked. `num_workers=0` means min(8, CPUs this process may run on)."""

  num_workers: int = 0
  timeout_s: float = 4.0  # hard wall-clock limit per answer; the worker is killed past it
  # The worker interrupts itself (cheaply, no restart) at this fraction of the limit; 0 leaves only the hard kill.
  soft_timeout_ratio: float = 0.75
  startup_timeout_s: float = 120.0
  worker_memory_bytes: Optional[int] = 2 << 30  # RLIMIT_AS per worker; None: no limit
  float_rounding: int = 6  # decimal places; two plain numbers must also agree to NUMBER_RELATIVE_TOLERANCE
  numeric_precision: int = 15
  screen: ScreenConfig = ScreenConfig()
  # The think tags, and whether the prompt opens the think block: where a completion's answer section starts.
  think: ThinkFormat = ThinkFormat()

  def __post_init__(self):
    if self.timeout_s <= 0 or not 0 <= self.soft_timeout_ratio < 1:
      raise ValueError(f"need timeout_s > 0 and 0 <= soft_timeout_ratio < 1, got {self.timeout_s}, "
                       f"{self.soft_timeout_ratio}")
    if self.num_workers < 0:  # a pool without workers would wait for answers forever
      raise ValueError(f"VerifierConfig.num_workers={self.num_workers} must be >= 0: set the number of verification "
                       f"worker processes, or 0 for the default (min(8, usable CPUs) = {default_num_workers()})")


def default_num_workers() -> int:
  """min(8, the CPUs this process may run on): in a container limited to a few cores of a big host, those few."""
  try:
    cpus = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not on Linux
    cpus = os.cpu_count() or 1
  return min(8, max(1, cpus))


@dataclasses.dataclass
class _Worker:
  proc: subprocess.Popen
  deadline: Optional[float]  # startup deadline until ready, then the running task's deadline
  ready: bool = False
  task: Optional[int] = None
  buffer: bytes = b""


def sanitize(text) -> str:
  """Any str (lone surrogates included) or bytes as valid UTF-8 text; invalid code points become U+FFFD / '?'."""
  if isinstance(text, (bytes, bytearray)):
    return bytes(text).decode("utf-8", errors="replace")
  return str(text).encode("utf-8", errors="replace").decode("utf-8")


def readable_answer(completion, config: Optional[VerifierConfig] = None) -> Optional[str]:
  """The final answer of `completion` as the verifier reads it (after the think block, at most
  `screen.max_answer_chars` long, passing the screen), or None where it reads none and scores the completion
  incorrect. `config` defaults to the module-wide pool's (`default_config`)."""
  config = default_config() if config is None else config
  try:
    answer = extract_answer(sanitize(completion), max_chars=config.screen.max_answer_chars, think=config.think)
    return None if answer is None or screen_problem(answer, config.screen) else answer
  except Exception as e:  # pylint: disable=broad-except
    # A model's output must never stop training or an evaluation: what cannot be read is graded incorrect.
    logger.warning("reading the answer of completion %.80r failed (%s: %s): graded incorrect", completion,
                   type(e).__name__, e)
    return None


def readable_gold(gold, config: Optional[VerifierConfig] = None) -> Optional[str]:
  """A gold answer as the verifier reads it (`extract_gold`, at most `screen.max_answer_chars` long, passing the
  screen), or None where it reads none (`gold_problem` says why): every completion graded against it would score
  incorrect. `config` defaults to the module-wide pool's (`default_config`)."""
  return _read_gold(gold, config)[0]


def gold_problem(gold, config: Optional[VerifierConfig] = None) -> Optional[str]:
  """Why the verifier reads no gold answer from `gold` (see `readable_gold`), or None where it reads one. The screen
  built for model output refuses some real answers too ("15!!", which math-verify would read as (15!)!)."""
  return _read_gold(gold, config)[1]


def _read_gold(gold, config: Optional[VerifierConfig]) -> tuple[Optional[str], Optional[str]]:
  """(the gold answer the verifier reads, None) or (None, why it reads none)."""
  config = default_config() if config is None else config
  answer = extract_gold(sanitize(gold), max_chars=config.screen.max_answer_chars)
  if answer is None:
    return None, f"no answer read from it (empty, or over {config.screen.max_answer_chars} characters)"
  problem = screen_problem(answer, config.screen)
  return (answer, None) if problem is None else (None, f"refused by the answer screen: {problem}")


class VerifierPool:
  """A fixed-size pool of verification workers. Thread-safe: one batch runs at a time."""

  def __init__(self, config: VerifierConfig = VerifierConfig()):
    self.config = config
    self.num_workers = config.num_workers or default_num_workers()
    self._lock = threading.Lock()
    self._selector = selectors.DefaultSelector()
    self._workers: list[_Worker] = []
    self._next_task_id = 0
    self._startup_failures = 0
    self._closed = False
    for _ in range(self.num_workers):
      self._workers.append(self._spawn())

  # -- public API ------------------------------------------------------------------------------------------------

  def verify_batch(self, completions: Sequence[str], golds: Sequence[str], *,
                   timeout_s: Optional[float] = None) -> list[bool]:
    """Whether each completion's final answer matches its gold answer (math-verify, gold first)."""
    if len(completions) != len(golds):
      raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    pairs: list[Optional[tuple[str, str]]] = []
    for completion, gold in zip(completions, golds):
      pred_answer = readable_answer(completion, self.config)
      gold_answer = readable_gold(gold, self.config)
      if gold_answer is None:
        logger.warning("gold answer %.80r cannot be verified against", gold)
        pairs.append(None)
      elif pred_answer is None:
        pairs.append(None)
      else:
        # "(B) 12" against the gold "B": the letter; against any other gold the answer as read.
        pairs.append((gold_answer, choice_letter(pred_answer, gold_answer)))
    checked = self.verify_answers([p for p in pairs if p is not None], timeout_s=timeout_s)
    verdicts = iter(checked)
    return [False if p is None else next(verdicts) for p in pairs]

  def verify_answers(self, pairs: Sequence[tuple[str, str]], *, timeout_s: Optional[float] = None,
                     soft_timeout_s: Optional[float] = None) -> list[bool]:
    """math-verify on already extracted (gold, pred) answer pairs, unscreened, each under the wall-clock limit.

    `timeout_s` (> 0) defaults to the config's; `soft_timeout_s` (>= 0) to `soft_timeout_ratio * timeout_s`, and 0
    disables the worker's own interruption. Other values raise ValueError.
    """
    timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
    # Checked here, per call, since the config's own check does not see an override: with no time at all every
    # worker would be killed and every answer that needs a worker would score incorrect, silently.
    if not timeout_s > 0:
      raise ValueError(f"verification timeout_s={timeout_s} must be > 0 seconds (the per-answer wall-clock limit): "
                       "check evaluation.verify_timeout_s / rollouts.verify_timeout_s, or leave it unset for "
                       f"VerifierConfig.timeout_s={self.config.timeout_s}")
    if soft_timeout_s is not None and not soft_timeout_s >= 0:
      raise ValueError(f"soft_timeout_s={soft_timeout_s} must be >= 0 seconds (0: no soft limit), or None for "
                       "VerifierConfig.soft_timeout_ratio * timeout_s")
    if soft_timeout_s is None:
      soft_timeout_s = self.config.soft_timeout_ratio * timeout_s
    if self._closed:
      raise RuntimeError("VerifierPool is shut down")
    unique = list(dict.fromkeys((sanitize(g), sanitize(p)) for g, p in pairs))
    # Two plain numbers are compared here, rounded as math-verify rounds them (`float_rounding` decimal places) and
    # to a relative tolerance as well: rounding alone makes every value below 5e-7 equal (3e-7 and 1e-7 round to 0).
    values = {pair: (plain_number(pair[0]), plain_number(pair[1])) for pair in unique}
    local = {pair: numbers_match(*values[pair], self.config.float_rounding) for pair in unique
             if None not in values[pair]}
    unique = [pair for pair in unique if pair not in local]
    if not unique:
      return [local[(sanitize(g), sanitize(p))] for g, p in pairs]
    with self._lock:
      if self._closed:
        raise RuntimeError("VerifierPool is shut down")
      try:
        verdicts = self._run(unique, timeout_s, soft_timeout_s)
      except BaseException:
        self._replace_busy_workers()  # a worker still on an abandoned task would answer the next batch
        raise
    verdicts.update(local)
    return [verdicts[(sanitize(g), sanitize(p))] for g, p in pairs]

  def worker_pids(self) -> list[int]:
    """Process ids of the current workers (for monitoring and tests)."""
    return [w.proc.pid for w in self._workers]

  def busy_worker_pids(self) -> list[int]:
    """Process ids of the workers with an answer in flight: a lock-free snapshot, readable while a batch runs."""
    return [w.proc.pid for w in list(self._workers) if w.task is not None]

  def shutdown(self, timeout_s: float = 2.0) -> None:
    """Ends every worker (end of input, then a kill after `timeout_s`). Idempotent."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
      for worker in self._workers:
        try:
          worker.proc.stdin.close()
        except OSError:
          pass
      deadline = time.monotonic() + timeout_s
      for worker in self._workers:
        try:
          worker.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          pass
        self._discard(worker)
      self._workers = []
      self._selector.close()

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc) -> None:
    self.shutdown()

  # -- workers ---------------------------------------------------------------------------------------------------

  def _spawn(self) -> _Worker:
    settings = {"memory_bytes": self.config.worker_memory_bytes, "float_rounding": self.config.float_rounding,
                "numeric_precision": self.config.numeric_precision, "parent_pid": os.getpid()}
    # -P: the script's own directory must not shadow standard modules on sys.path.
    proc = subprocess.Popen([sys.executable, "-P", _WORKER_SCRIPT, json.dumps(settings)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, close_fds=True)
    os.set_blocking(proc.stdout.fileno(), False)
    worker = _Worker(proc, deadline=time.monotonic() + self.config.startup_timeout_s)
    self._selector.register(proc.stdout, selectors.EVENT_READ, worker)
    return worker

  def _discard(self, worker: _Worker) -> None:
    try:
      self._selector.unregister(worker.proc.stdout)
    except (KeyError, ValueError):
      pass
    if worker.proc.poll() is None:
      worker.proc.kill()
    worker.proc.wait()
    for pipe in (worker.proc.stdin, worker.proc.stdout):
      try:
        pipe.close()
      except OSError:
        pass

  def _replace(self, worker: _Worker) -> None:
    if not worker.ready:
      self._startup_failures += 1
      if self._startup_failures > 3 * self.num_workers:
        raise RuntimeError(f"verification workers keep failing to start ({sys.executable} {_WORKER_SCRIPT}); "
                           "is math-verify installed in this interpreter? See the workers' stderr.")
    self._discard(worker)
    self._workers[self._workers.index(worker)] = self._spawn()

  def _replace_busy_workers(self) -> None:
    for worker in list(self._workers):
      if worker.task is not None:
        worker.ready = True  # not a start-up failure
        self._replace(worker)

  # -- one batch -------------------------------------------------------------------------------------------------

  def _run(self, unique: list[tuple[str, str]], timeout_s: float, soft_timeout_s: float) -> dict:
    verdicts: dict[tuple[str, str], bool] = {}
    queue = collections.deque(unique)
    in_flight: dict[int, tuple[str, str]] = {}
    for worker in list(self._workers):
      if worker.proc.poll() is not None:  # died between batches
        worker.ready = True
        self._replace(worker)

    def fail(worker: _Worker) -> None:
      """A dead or overdue worker: its task (if any) is not verified, and it is replaced."""
      if worker.task is not None:
        verdicts[in_flight.pop(worker.task)] = False
      self._replace(worker)

    while queue or in_flight:
      for worker in list(self._workers):
        if not (queue and worker.ready and worker.task is None):
          continue
        pair = queue.popleft()
        task_id, self._next_task_id = self._next_task_id, self._next_task_id + 1
        request = json.dumps({"id": task_id, "gold": pair[0], "pred": pair[1], "soft_timeout_s": soft_timeout_s})
        try:
          worker.proc.stdin.write(request.encode("ascii") + b"\n")
          worker.proc.stdin.flush()
        except OSError:  # died while idle: not this task's fault, so it goes back in the queue
          queue.appendleft(pair)
          self._replace(worker)
          continue
        worker.task, worker.deadline = task_id, time.monotonic() + timeout_s
        in_flight[task_id] = pair

      pending = [w.deadline for w in self._workers if not w.ready or w.task is not None]
      wait = max(0.0, min(pending) - time.monotonic()) if pending else 0.0
      for key, _ in self._selector.select(wait):
        worker = key.data
        if worker not in self._workers:
          continue
        try:
          chunk = os.read(key.fd, _READ_CHUNK)
        except BlockingIOError:
          continue
        if not chunk:
          fail(worker)
          continue
        worker.buffer += chunk
        while b"\n" in worker.buffer and worker in self._workers:
          line, worker.buffer = worker.buffer.split(b"\n", 1)
          try:
            message = json.loads(line)
            if not isinstance(message, dict):
              raise ValueError(line)
          except ValueError:
            fail(worker)
            break
          if "ready" in message:
            worker.ready, worker.deadline, self._startup_failures = True, None, 0
          elif message.get("id") == worker.task:
            verdicts[in_flight.pop(worker.task)] = bool(message["ok"])
            worker.task, worker.deadline = None, None

      now = time.monotonic()
      for worker in list(self._workers):
        if worker.deadline is not None and now >= worker.deadline:
          if worker.task is not None:
            logger.info("verification over %.1fs; restarting worker %d", timeout_s, worker.proc.pid)
          fail(worker)
    return verdicts


_default_pool: Optional[VerifierPool] = None
_default_config = VerifierConfig()
_default_lock = threading.Lock()
# A context variable, not a global: scoring with one pool must not change how another thread reads completions.
_scoring_think: contextvars.ContextVar[Optional[ThinkFormat]] = contextvars.ContextVar("scoring_think", default=None)


def configure(config: VerifierConfig) -> None:
  """Sets the module-wide pool's config; a running pool is shut down and restarts on next use."""
  global _default_config
  with _default_lock:
    _default_config = config
  shutdown()


def default_config() -> VerifierConfig:
  """The module-wide pool's config (`configure`): its `think` format is how completions are read everywhere
  (except while `reading_with` names another, see `think_format`)."""
  with _default_lock:
    return _default_config


def think_format() -> ThinkFormat:
  """How the format rewards read a completion: the think format `reading_with` set in this thread or task (the
  pool `score_batch` was given verifies with it), else the module-wide config's."""
  scoring = _scoring_think.get()
  return default_config().think if scoring is None else scoring


@contextlib.contextmanager
def reading_with(think: ThinkFormat) -> Iterator[None]:
  """Within the block, `think_format()` is `think`: the format rewards read completions as the pool that verifies
  them does."""
  token = _scoring_think.set(think)
  try:
    yield
  finally:
    _scoring_think.reset(token)


def default_pool() -> VerifierPool:
  """The module-wide pool, started on first use and shut down at interpreter exit."""
  global _default_pool
  with _default_lock:
    if _default_pool is None:
      _default_pool = VerifierPool(_default_config)
    return _default_pool


def shutdown() -> None:
  """Stops the module-wide pool (it restarts on next use)."""
  global _default_pool
  with _default_lock:
    pool, _default_pool = _default_pool, None
  if pool is not None:
    pool.shutdown()


atexit.register(shutdown)


def is_correct(completion: str, gold: str) -> bool:
  """Whether the completion's final answer (after the last `</think>`) is mathematically equal to `gold`."""
  return default_pool().verify_batch([completion], [gold])[0]


def verify_batch(completions: Sequence[str], golds: Sequence[str], *, timeout_s: Optional[float] = None,
                 pool: Optional[VerifierPool] = None) -> list[bool]:
  """`is_correct` over a batch, in parallel across the pool's workers."""
  return (pool or default_pool()).verify_batch(completions, golds, timeout_s=timeout_s)
