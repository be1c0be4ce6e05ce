"""Sweeps: a gin file x a grid of bindings, one workdir per run, run here one after another or printed as commands.

    python experiments/sweep.py --gin_file=experiments/configs/midtrain_tiny.gin --root=runs/sweep_lr \
        --sweep='{"product": {"optimizer.learning_rate": [1e-3, 3e-3]}, "zip": {"train.seed": [0, 1]}}'
    python experiments/sweep.py ... --mode=commands > launch.sh     # one line per run, for a cluster scheduler
    python experiments/sweep.py ... --mode=collect                  # table of the runs' latest metrics

The spec is JSON (inline or a file path): "product" axes are crossed, "zip" axes advance together (equal lengths),
and the two are crossed with each other. Each run's workdir is ROOT/<binding=value,...>, so re-running a sweep
resumes unfinished runs and leaves finished ones as they are (train.py resumes from the workdir); a name longer than
a file name may be (255 bytes: a long value, a system prompt, a list of files) is cut and ends in a hash of the
run's bindings. Since a run's name covers the swept bindings' last names only, ROOT/sweep.json records the
--gin_file / --gin_param values every run shares, the swept bindings' full names and each run name's full bindings
("runs"), and a root holding a sweep with other shared values is refused. The
table (ROOT/results.md, ROOT/results.json) holds each run's bindings and its final metrics: loss, eval loss and
next-token accuracy of the trained positions (token_accuracy); for GRPO, mean reward and the share of rollouts
whose answer verified (accuracy). In local mode a failing run does not stop the sweep: the other runs go on, the
table's status column marks it ("exit N", or "signal N" if it was killed; "ok" for a run that succeeded) and the
sweep exits non-zero at the end, naming the failed runs. A SIGTERM, SIGINT (Ctrl-C) or SIGHUP to the sweep reaches
the run in progress as a SIGTERM (it saves a checkpoint and stops); at any time, between runs too, no further run
starts, the table is written and the sweep exits 143; that run's
status is "preempted" only if it exited as train.py does once saved (143), else its "exit N" / "signal N", and the
runs not started are "not run". --mode=collect
tables the runs' latest metrics whether or not they finished: its step column says how far each got.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("loss", "eval_loss", "best_eval_loss", "token_accuracy", "reward_mean", "accuracy")


def load_spec(text: str) -> dict:
  if os.path.exists(text):
    with open(text) as f:
      text = f.read()
  elif not text.lstrip().startswith("{"):  # a path with a typo would be parsed as JSON and fail as such
    raise ValueError(f"--sweep={text!r}: no such spec file (an inline spec is a JSON object, {{...}})")
  try:
    spec = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"--sweep spec is not valid JSON ({e}): {text[:200]}") from None
  unknown = set(spec) - {"product", "zip"}
  if unknown:
    raise ValueError(f"sweep spec keys {sorted(unknown)} are not understood; use 'product' and/or 'zip'")
  return spec


def expand(spec: dict) -> list[dict]:
  """All runs of the spec, each a dict binding -> value, in a stable order."""
  product = spec.get("product", {})
  zipped = spec.get("zip", {})
  for kind, axes in (("product", product), ("zip", zipped)):
    not_lists = [k for k, v in axes.items() if not isinstance(v, list)]
    if not_lists:  # a string would be swept character by character
      raise ValueError(f"sweep axis {kind}[{not_lists[0]!r}] = {axes[not_lists[0]]!r}: give a list of values, e.g. "
                       f'{{"{not_lists[0]}": [{json.dumps(axes[not_lists[0]])}]}}')
  lengths = {len(v) for v in zipped.values()}
  if len(lengths) > 1:
    raise ValueError(f"'zip' axes must have equal lengths, got { {k: len(v) for k, v in zipped.items()} }")
  zip_rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())] if zipped else [{}]
  runs = []
  for values in itertools.product(*product.values()):
    for zip_row in zip_rows:
      runs.append({**dict(zip(product, values)), **zip_row})
  return runs


def check_runs(runs: list[dict]) -> None:
  """Every run needs its own workdir: an empty sweep, or two runs whose names coincide (the name keeps only each
  binding's last part and plain characters), would silently reuse one run's results for another."""
  if not runs:
    raise ValueError("the sweep spec gives no runs (an axis with no values?)")
  names = [run_name(b) for b in runs]
  clashes = sorted({n for n in names if names.count(n) > 1})
  if clashes:
    raise ValueError(f"sweep runs would share workdirs {clashes}: make their values differ in more than "
                     "punctuation or type, or split the sweep")


def check_unscoped(swept: list[str], gin_params: list[str]) -> None:
  """Refuses a swept binding or shared --gin_param with a gin scope (`sft/train.num_steps`): no configurable of a
  run is called in a scope, so gin would take it and every run would train with the unscoped value."""
  bindings = [p for p in gin_params if "=" in p and p.split()[0] not in ("include", "import")]  # not `include 'a/b'`
  for name, where in [(key, "sweep axis") for key in swept] + [(p.split("=", 1)[0], "--gin_param") for p in bindings]:
    if "/" in name:
      scope, _, plain = name.strip().rpartition("/")
      raise ValueError(f"{where} {name.strip()!r} has the gin scope {scope + '/'!r}, which reaches no setting of a "
                       f"run: drop the scope ({plain!r})")


def check_root(root: str, gin_files: list[str], gin_params: list[str], swept: list[str] = (),
               runs: list[dict] = ()) -> None:
  """Records the settings every run shares (and the swept bindings' full names) in ROOT/sweep.json, and refuses a
  root whose record differs: a run name covers only the swept bindings' last names (grpo.temperature and
  evaluation.temperature both give temperature=...), so a finished run of another sweep would be reported as this
  one's. sweep.json's "runs" maps each run name to its full bindings (a long name is cut; see `run_name`); runs
  recorded by earlier sweeps of the same settings are kept."""
  shared = {"gin_files": list(gin_files), "gin_params": list(gin_params), "swept": sorted(swept)}
  path = os.path.join(root, "sweep.json")
  named = {run_name(b): b for b in runs}
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f)
    recorded_runs = recorded.pop("runs", {})
    recorded.setdefault("swept", shared["swept"])  # a record written before the swept names were kept
    started = [name for name in sorted(os.listdir(root))
               if any(os.path.exists(os.path.join(root, name, part)) for part in ("metrics.jsonl", "checkpoints"))]
    if recorded != shared and not started:
      # No run trained under the old settings (every one failed at start-up, say on a misspelt binding): nothing
      # could be reported as this sweep's, so the fixed sweep goes ahead.
      print(f"{root} records other shared settings ({recorded}) but holds no run that started: recording this "
            "sweep's", flush=True)
    elif recorded != shared:
      raise ValueError(f"{root} holds runs of a sweep with other shared settings ({recorded}, now {shared}); its "
                       "finished runs would be reported as this sweep's. Use another --root, or the same "
                       "--gin_file / --gin_param values")
    elif named.items() <= recorded_runs.items():
      return
    else:
      named = {**recorded_runs, **named}
  os.makedirs(root, exist_ok=True)
  with open(path, "w") as f:
    json.dump({**shared, "runs": named}, f, indent=1)


def gin_value(value) -> str:
  return repr(value) if not isinstance(value, str) else json.dumps(value)


# A file name holds at most 255 bytes: a longer run name (a system prompt, a model.overrides dict or a list of files
# as the value) is cut to that, ending in a hash of the full bindings so runs that differ past the cut keep their
# own workdirs. Names that fit are kept whole, as a sweep started before names were cut named them.
MAX_NAME_BYTES = 255


def run_name(bindings: dict) -> str:
  """The run's workdir name under ROOT (plain ASCII characters only, so characters are bytes)."""
  name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in bindings.items()) or "base"
  name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)
  if len(name) <= MAX_NAME_BYTES:
    return name
  digest = hashlib.sha256(json.dumps(bindings, sort_keys=True, default=repr).encode()).hexdigest()[:12]
  return f"{name[:MAX_NAME_BYTES - len(digest) - 1]}-{digest}"


def command(gin_files, extra_params, bindings, workdir) -> list[str]:
  cmd = [sys.executable, os.path.join(HERE, "train.py")]
  cmd += [f"--gin_file={f}" for f in gin_files]
  cmd += [f"--gin_param={p}" for p in extra_params]
  cmd += [f"--gin_param={k}={gin_value(v)}" for k, v in bindings.items()]
  return cmd + [f"--workdir={workdir}"]


def final_metrics(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  out = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a run killed mid-write (its resume drops it too)
        continue
      # null is a non-finite value (a skipped update's loss): the metric keeps its last value, as where it is absent
      out.update({k: record[k] for k in METRICS if record.get(k) is not None})
      out["step"] = max(out.get("step", 0), record.get("step", 0))
  return out


def collect(root: str, runs: list[dict], statuses: Optional[dict[str, str]] = None) -> list[dict]:
  """Writes ROOT/results.md and ROOT/results.json; `statuses` (run name -> `run_status`, or "not run") adds a
  status column, which only local mode knows (runs launched elsewhere report to their scheduler)."""
  rows = [dict(run=run_name(b), **b, **final_metrics(os.path.join(root, run_name(b)))) for b in runs]
  if statuses is not None:
    for row in rows:
      row["status"] = statuses[row["run"]]
  keys = (["run"] + (["status"] if statuses is not None else []) + list(runs[0]) + ["step"]
          + [m for m in METRICS if any(m in r for r in rows)])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for r in rows:
    lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
                 + " |")
  os.makedirs(root, exist_ok=True)
  _write_atomically(os.path.join(root, "results.md"), "\n".join(lines) + "\n")
  _write_atomically(os.path.join(root, "results.json"), json.dumps(rows, indent=1))
  print("\n".join(lines))
  return rows


def _write_atomically(path: str, text: str) -> None:
  """A kill while writing leaves the previous file whole, not a truncated one."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


_PREEMPTED = 143  # train.py's exit after a SIGTERM once its checkpoint is saved (loop.Preempted)


def run_status(code: int, forwarded: bool = False) -> str:
  """A run's status column from its exit code. "preempted" is train.py's exit after a SIGTERM (it saved, or its grace
  period ran out with the previous checkpoint intact), whether or not the sweep forwarded one, and, once the sweep
  `forwarded` one, the SIGTERM's own death of a run stopped before its training loop took the signal over (reading
  data, loading params: a rerun starts there again). Any other exit is a failure, even one that follows a forwarded
  signal (a crash while saving, a SIGKILL)."""
  if code == 0:
    return "ok"
  if code == _PREEMPTED or (forwarded and code == -signal.SIGTERM):
    return "preempted"
  return f"exit {code}" if code > 0 else f"signal {-code}"


def _run_forwarding_signals(cmd: list[str]) -> int:
  """Runs one train.py, passing a SIGTERM, SIGINT or SIGHUP the sweep receives on to it as one SIGTERM (under
  `_forwarding_signals`), which train.py answers by saving a checkpoint and stopping (a scheduler stopping the sweep
  signals the sweep's process only: the run went on untold, and lost its steps at the SIGKILL that followed). The run
  has a session of its own, so a Ctrl-C in the terminal reaches the sweep alone (a SIGINT would interrupt train.py
  mid-step, unsaved). Returns its exit code (negative: killed by a signal)."""
  process = subprocess.Popen(cmd, start_new_session=True)
  _running.append(process)
  try:
    if _stopping:  # the signal came while the run was starting: it is told now
      process.send_signal(signal.SIGTERM)
    return process.wait()
  finally:
    _running.remove(process)


@contextlib.contextmanager
def _forwarding_signals():
  """For the whole sweep, a SIGTERM, SIGINT or SIGHUP is recorded (the sweep launches no more runs) and passed on
  to the run in progress, if any: between two runs, or while the results are collected, it used to meet the default
  handler, which ended the sweep without its results table."""
  def forward(signum, frame):  # pylint: disable=unused-argument
    if not _stopping:  # once: a second SIGTERM ends train.py's grace period
      for process in _running:
        process.send_signal(signal.SIGTERM)
    _stopping.append(signum)

  # SIGHUP too: a dropped ssh session ends the sweep, and the run, in a session of its own, would never hear of it.
  previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


_running: list[subprocess.Popen] = []
_stopping: list[int] = []


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_param", action="append", default=[], help="bindings shared by every run")
  parser.add_argument("--sweep", required=True, help="JSON spec or a path to one")
  parser.add_argument("--root", required=True, help="parent directory of the runs' workdirs")
  parser.add_argument("--mode", choices=("local", "commands", "collect"), default="local")
  args = parser.parse_args(argv)
  _stopping.clear()  # a signal that stopped an earlier sweep of this process is not this one's
  runs = expand(load_spec(args.sweep))
  check_runs(runs)
  check_unscoped(sorted({key for run in runs for key in run}), args.gin_param)
  if args.mode != "collect":
    check_root(args.root, args.gin_file, args.gin_param, sorted({key for run in runs for key in run}), runs)
  if args.mode == "commands":
    for b in runs:
      print(shlex.join(command(args.gin_file, args.gin_param, b, os.path.join(args.root, run_name(b)))))
    return runs
  if args.mode == "collect":
    return collect(args.root, runs)
  with _forwarding_signals():
    return _run_locally(args, runs)


def _run_locally(args, runs: list[dict]) -> list[dict]:
  statuses = {}
  for i, b in enumerate(runs):
    name = run_name(b)
    if _stopping:  # a signal between two runs
      _stop(args.root, runs, statuses, f"before {name}")
    print(f"[{i + 1}/{len(runs)}] {name}", flush=True)
    # One failing run (a bad value of the swept binding, say) must not cost the others their results.
    code = _run_forwarding_signals(command(args.gin_file, args.gin_param, b, os.path.join(args.root, name)))
    statuses[name] = run_status(code, forwarded=bool(_stopping))
    if _stopping or code == _PREEMPTED:  # the sweep (or its node) was told to stop: no further run is started
      _stop(args.root, runs, statuses, f"after {name} ({statuses[name]})")
    if code != 0:
      print(f"[{i + 1}/{len(runs)}] {name} failed ({statuses[name]})"
            + ("; going on with the other runs" if i + 1 < len(runs) else ""), flush=True)
  rows = collect(args.root, runs, statuses)
  failed = [f"{name} ({status})" for name, status in statuses.items() if status != "ok"]
  if failed:
    sys.exit(f"{len(failed)} of {len(runs)} sweep runs failed: {', '.join(failed)}. Their output is above and "
             f"their rows in {os.path.join(args.root, 'results.md')} are marked; fix the cause and re-run the sweep "
             "(finished runs are kept).")
  return rows


def _stop(root: str, runs: list[dict], statuses: dict[str, str], when: str) -> None:
  collect(root, runs, {run_name(r): statuses.get(run_name(r), "not run") for r in runs})
  print(f"sweep stopped by a signal {when}; re-run it to go on (finished runs are kept)", flush=True)
  sys.exit(_PREEMPTED)


if __name__ == "__main__":
  main()
