"""Sweeps: spec expansion, per-run workdirs, launch commands, and a real 2-run sweep with its results table."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import sweep  # noqa: E402


def test_product_and_zip_expansion():
  runs = sweep.expand({"product": {"optimizer.learning_rate": [0.1, 0.2]},
                       "zip": {"train.seed": [0, 1, 2], "data.seq_len": [8, 16, 32]}})
  assert len(runs) == 6
  assert runs[0] == {"optimizer.learning_rate": 0.1, "train.seed": 0, "data.seq_len": 8}
  assert runs[-1] == {"optimizer.learning_rate": 0.2, "train.seed": 2, "data.seq_len": 32}
  assert len({sweep.run_name(r) for r in runs}) == 6
  with pytest.raises(ValueError, match="equal lengths"):
    sweep.expand({"zip": {"a.b": [1, 2], "c.d": [1]}})
  with pytest.raises(ValueError, match="not understood"):
    sweep.load_spec('{"grid": {}}')
  for spec in ({"product": {"train.seed": "012"}}, {"zip": {"optimizer.learning_rate": "0.1"}}):
    with pytest.raises(ValueError, match="give a list of values"):  # not swept character by character
      sweep.expand(spec)


def test_commands_mode_prints_one_launch_line_per_run(capsys, tmp_path):
  sweep.main(["--gin_file=experiments/configs/midtrain_tiny.gin", f"--root={tmp_path}/x", "--mode=commands",
              '--sweep={"product": {"train.seed": [0, 1], "data.tokenizer": ["tiny:phi-4"]}}'])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all("experiments/train.py" in l for l in lines)
  assert "--gin_param=train.seed=1" in lines[1] and f"--workdir={tmp_path}/x/seed=1,tokenizer=tiny_phi-4" in lines[1]


def test_a_root_holding_a_sweep_with_other_shared_settings_is_refused(tmp_path, monkeypatch):
  """Run names cover the swept bindings only: a finished run of a sweep with another --gin_param would be
  reported as this sweep's result."""
  # A run that fails at start-up writes nothing: a sweep whose runs all did so may be run again with other settings.
  monkeypatch.setattr(sweep, "command", lambda files, params, bindings, workdir: [sys.executable, "-c", "exit(1)"])
  args = [f"--root={tmp_path}", '--sweep={"product": {"optimizer.learning_rate": [0.003]}}',
          "--gin_file=experiments/configs/midtrain_tiny.gin"]
  with pytest.raises(SystemExit):
    sweep.main(args + ["--gin_param=optimizer.weight_decy=0.0"])
  # A run that started (its metrics.jsonl) belongs to its sweep's settings.
  started = ("import os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
             "open(os.path.join(sys.argv[1], 'metrics.jsonl'), 'w').close()")
  monkeypatch.setattr(sweep, "command", lambda files, params, bindings, workdir: [sys.executable, "-c", started,
                                                                                   workdir])
  sweep.main(args + ["--gin_param=optimizer.weight_decay=0.0"])
  sweep.main(args + ["--gin_param=optimizer.weight_decay=0.0"])  # the same sweep again: fine
  with pytest.raises(ValueError, match="holds runs of a sweep with other shared settings"):
    sweep.main(args + ["--gin_param=optimizer.weight_decay=0.5"])
  with pytest.raises(ValueError, match="holds runs of a sweep"):
    sweep.main(args + ["--gin_param=optimizer.weight_decay=0.5", "--mode=commands"])
  sweep.main(args + ["--gin_param=optimizer.weight_decay=0.5", "--mode=collect"])  # reading results is fine
  # Another binding of the same last name gives the same run names (learning_rate=0.003): refused too.
  other = [f"--root={tmp_path}", '--sweep={"product": {"other.learning_rate": [0.003]}}',
           "--gin_file=experiments/configs/midtrain_tiny.gin", "--gin_param=optimizer.weight_decay=0.0"]
  with pytest.raises(ValueError, match="holds runs of a sweep"):
    sweep.main(other)


@pytest.mark.slow
def test_two_run_sweep_collects_a_table(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices=8))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
       "--gin_file=experiments/configs/midtrain_tiny.gin", "--gin_param=train.num_steps=3",
       "--gin_param=train.eval_every=0", "--gin_param=data.seq_len=64", f"--root={tmp_path}",
       '--sweep={"product": {"optimizer.learning_rate": [0.0, 0.003]}}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.load(open(tmp_path / "results.json"))
  assert [r["optimizer.learning_rate"] for r in rows] == [0.0, 0.003]
  assert all(r["step"] == 3 for r in rows)
  assert rows[1]["loss"] < rows[0]["loss"]  # learning rate 0 does not train; 0.003 does
  assert "| learning_rate=0.003 |" in open(tmp_path / "results.md").read()


def test_sweeps_whose_runs_would_share_a_workdir_or_that_have_no_runs_are_refused():
  with pytest.raises(ValueError, match="share workdirs"):
    sweep.check_runs(sweep.expand({"product": {"data.train_files": [["a/b.jsonl"], ["a_b.jsonl"]]}}))
  with pytest.raises(ValueError, match="no runs"):
    sweep.check_runs(sweep.expand({"product": {"optimizer.learning_rate": []}}))
  sweep.check_runs(sweep.expand({"product": {"optimizer.learning_rate": [0.1, 0.2]}}))


def test_a_long_value_gives_a_capped_unique_run_name_recorded_in_sweep_json(tmp_path, monkeypatch):
  """A long value (a system prompt, a model.overrides dict, a list of files) made a workdir name over the 255-byte
  limit of a file name, and every run died with "File name too long"."""
  prompts = ["You are a careful math tutor. " * 10, "You are a careful math tutor. " * 10 + "Be brief."]
  runs = sweep.expand({"product": {"data.system_prompt": prompts, "train.seed": [0, 1]}})
  names = [sweep.run_name(r) for r in runs]
  assert len(set(names)) == 4 and all(len(n.encode()) <= 255 for n in names), names
  assert all(n.startswith("system_prompt=You_are_a_careful") for n in names)
  sweep.check_runs(runs)
  assert sweep.run_name({"train.seed": 1}) == "seed=1"  # a short name stays as it was (a rerun finds its runs)
  assert sweep.run_name({"data.system_prompt": "x" * 230}) == "system_prompt=" + "x" * 230  # so does one that fits
  monkeypatch.setattr(sweep, "command", lambda files, params, bindings, workdir: [
      sys.executable, "-c", "import os, sys; os.makedirs(sys.argv[1])", workdir])
  sweep.main(["--gin_file=unused.gin", f"--root={tmp_path}", "--sweep=" + json.dumps(
      {"product": {"data.system_prompt": prompts, "train.seed": [0, 1]}})])
  assert sorted(os.listdir(tmp_path)) == sorted(names + ["results.json", "results.md", "sweep.json"])
  recorded = json.load(open(tmp_path / "sweep.json"))
  assert recorded["runs"] == {n: r for n, r in zip(names, runs)}
  # The same sweep with one more value keeps the runs recorded before; its shared settings still decide a clash.
  sweep.main(["--gin_file=unused.gin", f"--root={tmp_path}", "--mode=commands", "--sweep=" + json.dumps(
      {"product": {"data.system_prompt": prompts + ["Be terse."], "train.seed": [0, 1]}})])
  recorded = json.load(open(tmp_path / "sweep.json"))
  assert len(recorded["runs"]) == 6 and recorded["gin_files"] == ["unused.gin"]


def test_a_failing_run_is_marked_and_the_others_still_run(tmp_path, monkeypatch, capsys):
  # Stand-in runs that exit with the code their binding names, so the sweep's own bookkeeping is tested in seconds.
  monkeypatch.setattr(sweep, "command",
                      lambda files, params, bindings, workdir: [sys.executable, "-c",
                                                                f"raise SystemExit({bindings['train.seed']})"])
  with pytest.raises(SystemExit) as raised:
    sweep.main(["--gin_file=unused.gin", f"--root={tmp_path}", '--sweep={"product": {"train.seed": [3, 0, 2]}}'])
  assert "2 of 3 sweep runs failed: seed=3 (exit 3), seed=2 (exit 2)" in str(raised.value.code)
  rows = json.load(open(tmp_path / "results.json"))
  assert [(r["run"], r["status"]) for r in rows] == [("seed=3", "exit 3"), ("seed=0", "ok"), ("seed=2", "exit 2")]
  assert "| seed=3 | exit 3 |" in open(tmp_path / "results.md").read()
  assert "[3/3] seed=2" in capsys.readouterr().out  # the runs after the first failure still ran


def test_a_run_failing_at_config_time_still_gets_a_results_table(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices=1))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
       "--gin_file=experiments/configs/midtrain_tiny.gin", f"--root={tmp_path}",
       '--sweep={"product": {"data.train_files": [[]]}}'],  # no training data: train.py stops before compiling
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "1 of 1 sweep runs failed: train_files=__ (exit 1)" in proc.stderr
  rows = json.load(open(tmp_path / "results.json"))
  assert [(r["run"], r["status"]) for r in rows] == [("train_files=__", "exit 1")]


def test_results_table_holds_each_runs_last_metrics_and_every_metric_any_run_has(tmp_path):
  """A run's row shows its metrics as last logged (its step the highest); a metric only some runs log (GRPO's
  reward, say) still gets a column, left blank for the others."""
  runs = sweep.expand({"product": {"train.seed": [0, 1]}})
  logs = {"seed=0": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.75}, {"step": 3, "loss": 2.0}],
          "seed=1": [{"step": 1, "loss": 4.0, "reward_mean": 0.25}, {"step": 2, "loss": 3.5, "reward_mean": 0.5}]}
  for name, records in logs.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  with open(tmp_path / "seed=1" / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "loss": 1.')  # a line cut short by a run killed mid-write
  rows = sweep.collect(str(tmp_path), runs)
  assert [(r["step"], r["loss"]) for r in rows] == [(3, 2.0), (2, 3.5)]
  assert rows[0]["eval_loss"] == 2.75 and rows[1]["reward_mean"] == 0.5 and "reward_mean" not in rows[0]
  header, _, first, second = (tmp_path / "results.md").read_text().splitlines()
  assert header == "| run | train.seed | step | loss | eval_loss | reward_mean |"
  assert first == "| seed=0 | 0 | 3 | 2 | 2.75 |  |" and second == "| seed=1 | 1 | 2 | 3.5 |  | 0.5 |"


def test_a_null_metric_leaves_the_last_logged_value_in_the_results(tmp_path):
  """metrics.jsonl writes a non-finite value as null (a skipped update's loss, an eval set with nothing to score):
  the row keeps the metric's last value, as for a record without it, not None ("None" in the table)."""
  runs = sweep.expand({"product": {"train.seed": [0]}})
  records = [{"step": 1, "loss": 3.0, "eval_loss": 2.5}, {"step": 2, "loss": None, "skipped_update": 1.0},
             {"step": 3, "loss": None, "eval_loss": None}]
  (tmp_path / "seed=0").mkdir()
  (tmp_path / "seed=0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  rows = sweep.collect(str(tmp_path), runs)
  assert (rows[0]["step"], rows[0]["loss"], rows[0]["eval_loss"]) == (3, 3.0, 2.5)
  assert (tmp_path / "results.md").read_text().splitlines()[2] == "| seed=0 | 0 | 3 | 3 | 2.5 |"


def test_a_run_killed_by_a_signal_is_marked_with_it(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "command", lambda files, params, bindings, workdir: [
      sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
  with pytest.raises(SystemExit, match=r"1 of 1 sweep runs failed: seed=0 \(signal 15\)"):
    sweep.main(["--gin_file=unused.gin", f"--root={tmp_path}", '--sweep={"product": {"train.seed": [0]}}'])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])  # SIGHUP: a dropped ssh session
def test_a_sigterm_to_the_sweep_reaches_the_running_run_and_starts_no_other(tmp_path, signum):
  """subprocess.run passed no signal on: a scheduler stopping the sweep left its train.py running untold (its steps
  lost at the SIGKILL that follows) and would have started the next run. A Ctrl-C (SIGINT) reaches the run as the
  SIGTERM train.py saves on (a SIGINT interrupted it mid-step, unsaved)."""
  child = ("import signal, sys, time, pathlib\n"
           "out = pathlib.Path(sys.argv[1])\n"
           "signal.signal(signal.SIGTERM, lambda *a: (out.with_suffix('.term').write_text('saved'), sys.exit(143)))\n"
           "out.with_suffix('.started').write_text('')\n"
           "time.sleep(60)\n")
  driver = tmp_path / "driver.py"
  driver.write_text(
      "import sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'experiments')!r})\n"
      "import sweep\n"
      f"sweep.command = lambda files, params, b, workdir: [sys.executable, '-c', {child!r}, workdir]\n"
      f"sweep.main(['--gin_file=unused.gin', '--root={tmp_path / 'root'}', "
      "'--sweep={\"product\": {\"train.seed\": [0, 1]}}'])\n")
  proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  started = tmp_path / "root" / "seed=0.started"
  for _ in range(600):
    if started.exists():
      break
    time.sleep(0.1)
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 143, out
  assert (tmp_path / "root" / "seed=0.term").read_text() == "saved"  # the run in progress was told
  assert not (tmp_path / "root" / "seed=1.started").exists()  # and no other started
  rows = json.load(open(tmp_path / "root" / "results.json"))
  assert [(r["run"], r["status"]) for r in rows] == [("seed=0", "preempted"), ("seed=1", "not run")]


def test_a_sigterm_between_two_runs_stops_the_sweep_with_its_results_table(tmp_path):
  """The signal handlers were put back after each run: a SIGTERM between two runs (or while results were collected)
  met the default handler, which ended the sweep with no results table and no "not run" rows."""
  driver = tmp_path / "driver.py"
  driver.write_text(
      "import os, signal, sys\n"
      f"sys.path.insert(0, {os.path.join(ROOT, 'experiments')!r})\n"
      "import sweep\n"
      "sweep.command = lambda files, params, b, workdir: [sys.executable, '-c', 'pass']\n"
      "status = sweep.run_status\n"
      "def signalled(code, forwarded=False):  # right after the first run ended\n"
      "  os.kill(os.getpid(), signal.SIGTERM)\n"
      "  return status(code, forwarded)\n"
      "sweep.run_status = signalled\n"
      f"sweep.main(['--gin_file=unused.gin', '--root={tmp_path / 'root'}', "
      "'--sweep={\"product\": {\"train.seed\": [0, 1]}}'])\n")
  proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 143, proc.stdout + proc.stderr
  rows = json.load(open(tmp_path / "root" / "results.json"))
  assert [(r["run"], r["status"]) for r in rows] == [("seed=0", "ok"), ("seed=1", "not run")]
  assert not list((tmp_path / "root").glob("*.tmp"))


# -15: the forwarded SIGTERM killed a run before its training loop took the signal over (nothing lost, it reruns).
@pytest.mark.parametrize("code,status", [(143, "preempted"), (-15, "preempted"), (1, "exit 1"), (-9, "signal 9"),
                                         (0, "ok")])
def test_only_a_run_that_exits_as_preempted_is_marked_preempted_after_a_signal(tmp_path, monkeypatch, capsys, code,
                                                                                status):
  """Any non-zero exit after the sweep forwarded a signal was marked "preempted", as if the run had saved and could
  resume: a run that crashed meanwhile (exit 1) or was killed (SIGKILL) read as a clean stop."""
  def signalled_run(cmd):  # the sweep receives a SIGTERM while the run is in progress; the run exits with `code`
    sweep._stopping.append(signal.SIGTERM)
    return code

  monkeypatch.setattr(sweep, "_run_forwarding_signals", signalled_run)
  with pytest.raises(SystemExit) as raised:
    sweep.main(["--gin_file=unused.gin", f"--root={tmp_path}", '--sweep={"product": {"train.seed": [0, 1]}}'])
  assert raised.value.code == 143  # the sweep itself was stopped by the signal
  rows = json.load(open(tmp_path / "results.json"))
  assert [(r["run"], r["status"]) for r in rows] == [("seed=0", status), ("seed=1", "not run")]
  assert f"sweep stopped by a signal after seed=0 ({status})" in capsys.readouterr().out


def test_a_mistyped_spec_path_is_named():
  with pytest.raises(ValueError, match=r"--sweep='sweeps/lr.jsn': no such spec file"):
    sweep.load_spec("sweeps/lr.jsn")
  with pytest.raises(ValueError, match=r"--sweep spec is not valid JSON"):
    sweep.load_spec('{"product": ')


def test_a_signal_that_stopped_one_sweep_does_not_stop_the_next(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "command", lambda files, params, b, workdir: [sys.executable, "-c", "pass"])
  sweep._stopping.append(signal.SIGTERM)  # what an earlier, stopped sweep of this process left
  rows = sweep.main(["--gin_file=unused.gin", f"--root={tmp_path}", '--sweep={"product": {"train.seed": [0, 1]}}'])
  assert [r["status"] for r in rows] == ["ok", "ok"]


@pytest.mark.parametrize("argv", [
    ["--sweep", '{"product": {"sft/optimizer.learning_rate": [0.1, 0.2]}}'],
    ["--sweep", '{"product": {"optimizer.learning_rate": [0.1, 0.2]}}', "--gin_param=sft/train.num_steps=7"],
])
def test_a_gin_scoped_binding_is_refused_before_any_run(tmp_path, argv):
  """A scoped binding reaches no configurable of a run: every run would have trained with the unscoped value."""
  with pytest.raises(ValueError, match="gin scope 'sft/'"):
    sweep.main(["--gin_file=experiments/configs/sft_tiny.gin", "--root", str(tmp_path), "--mode", "commands", *argv])
  assert not os.listdir(tmp_path)
  # a path with a slash in a binding's value is no scope
  sweep.check_unscoped(["data.train_files"], ['data.train_files=["a/b.jsonl"]'])
  sweep.check_unscoped([], ["include 'experiments/configs/recipe_tiny/quick.gin'", "import a.b"])  # no bindings
