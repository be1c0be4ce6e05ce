"""Per-process data-iterator states in checkpoints, and the checks of `distributed.initialize`.

Each process of a multi-host run reads its own shard of the data, so each saves its own iterator position and
must get that one back on resume. The two-process test runs this file as its worker (`python FILE WORKDIR`):
every process saves a different data state through `Checkpointer` and restores it; a checkpoint written by one
process with a data state is refused by two (and the other way round), one without a data state restores on
either; a value only one process cannot encode as JSON makes both raise, not wait.
"""

import json
import logging
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_SIZE = 8


def _state(jax, mesh):
  from jax.sharding import NamedSharding, PartitionSpec
  values = np.arange(STATE_SIZE, dtype=np.float32)
  return {"w": jax.make_array_from_callback(values.shape, NamedSharding(mesh, PartitionSpec("fsdp")),
                                            lambda index: values[index])}


def _target(jax, state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _data_state(process: int) -> dict:
  # Like a packing pipeline's: other positions and JSON of another length on each process, strings included.
  return {"rows": {"parent": {"next_index": 6 - 2 * process}, "counts": [[3] * (process + 1)]},
          "exhausted": process == 1, "source": f"shard-{process}-\u00e9"}


def _worker(workdir: str) -> None:
  import jax
  from jax.experimental import multihost_utils

  from phi_jax import sharding
  from phi_jax.sharding import distributed
  from phi_jax.train import checkpoint

  distributed.initialize()
  state = _state(jax, sharding.make_mesh({"fsdp": -1}))
  mine = _data_state(jax.process_index())
  result = {"process": jax.process_index(), "processes": jax.process_count(), "saved": mine}

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "per_process"), save_interval_steps=1)
  ckpt.save(1, state, data_state=mine, meta={"run": "two"}, force=True)
  ckpt.wait()
  step, restored, data, meta = ckpt.restore_latest(_target(jax, state))
  whole = multihost_utils.process_allgather(restored["w"], tiled=True)
  result.update(restored_step=step, restored=data, meta=meta, w=np.asarray(whole).tolist())
  ckpt.close()

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "no_data"), save_interval_steps=1, async_save=False)
  ckpt.save(1, state, data_state=None, force=True)
  result["no_data"] = ckpt.restore(1, _target(jax, state))[1]
  ckpt.close()

  # Written by the single-process parent: without a data state it restores here, with one it is refused.
  for name in ("single_no_data", "single_with_data"):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, name), save_interval_steps=1)
    try:
      result[name] = {"data": ckpt.restore(1, _target(jax, state))[1]}
    except checkpoint.IncompatibleCheckpointError as e:
      result[name] = {"error": str(e)}
    ckpt.close()
  # A value JSON cannot encode on one process: both raise, neither waits in the gather for the other.
  try:
    distributed.allgather_json({1, 2} if jax.process_index() == 1 else [1, 2])
  except TypeError as e:
    result["unencodable"] = str(e)
  print(json.dumps(result), flush=True)


@pytest.mark.slow
def test_each_process_restores_its_own_data_state(tmp_path):
  import jax

  from phi_jax import sharding
  from phi_jax.train import checkpoint
  import two_processes
  from xla_flags import xla_flags

  state = _state(jax, sharding.make_mesh({"fsdp": -1}))
  for name, data_state in (("single_no_data", {}), ("single_with_data", {"next_index": 3})):
    ckpt = checkpoint.Checkpointer(str(tmp_path / name), save_interval_steps=1, async_save=False)
    ckpt.save(1, state, data_state=data_state, force=True)
    assert ckpt.restore(1, _target(jax, state))[1] == data_state  # the single-process format, as it always was
    ckpt.close()

  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices=2), PYTHONUNBUFFERED="1")
  outputs = two_processes.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env, 240)
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]

  assert [(r["process"], r["processes"]) for r in results] == [(0, 2), (1, 2)]
  assert [r["restored"] for r in results] == [_data_state(0), _data_state(1)]  # each its own, not process 0's
  for r in results:
    assert (r["restored_step"], r["meta"], r["no_data"]) == (1, {"run": "two"}, {})
    assert r["single_no_data"] == {"data": {}}
    assert "not JSON-serialisable on process(es) [1]" in r["unencodable"]
    assert "2 processes" in r["single_with_data"]["error"] and "one-process run" in r["single_with_data"]["error"]
    assert r["w"] == list(range(STATE_SIZE))

  # Back on one process: the per-process positions cannot be mapped onto it; no data state restores anywhere.
  ckpt = checkpoint.Checkpointer(str(tmp_path / "per_process"), save_interval_steps=1)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="same number of processes"):
    ckpt.restore(1, _target(jax, state))
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "no_data"), save_interval_steps=1)
  restored, data, _ = ckpt.restore(1, _target(jax, state))
  ckpt.close()
  assert data == {}
  np.testing.assert_array_equal(jax.device_get(restored["w"]), np.arange(STATE_SIZE, dtype=np.float32))


@pytest.fixture
def no_cluster(monkeypatch):
  """An environment without any multi-process settings; jax.distributed must not be started."""
  from phi_jax.sharding import distributed
  for name in ("PHI_JAX_COORDINATOR_ADDRESS", "PHI_JAX_NUM_PROCESSES", "PHI_JAX_PROCESS_ID",
               *distributed._SLURM_STEP, *distributed._CLUSTER_MARKERS):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_initialized", False)
  started = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: started.append((a, k)))
  return started


@pytest.mark.parametrize("env,kwargs", [
    ({"PHI_JAX_NUM_PROCESSES": "2", "PHI_JAX_PROCESS_ID": "1"}, {}),
    ({"PHI_JAX_NUM_PROCESSES": "2"}, {}),
    ({"PHI_JAX_PROCESS_ID": "1"}, {}),
    ({}, {"num_processes": 4, "process_id": 0}),
    ({}, {"process_id": 1}),
    ({"PHI_JAX_PROCESS_ID": "0"}, {}),  # a process id alone implies other processes; only num_processes=1 excuses it
])
def test_processes_without_a_coordinator_are_refused(monkeypatch, no_cluster, env, kwargs):
  from phi_jax.sharding import distributed
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match="PHI_JAX_COORDINATOR_ADDRESS"):
    distributed.initialize(**kwargs)
  assert no_cluster == []


SLURM_STEP_OF_4 = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1",
                   "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("env", [{}, {"PHI_JAX_NUM_PROCESSES": "1"}, {"PHI_JAX_NUM_PROCESSES": "1",
                                                                     "PHI_JAX_PROCESS_ID": "0"},
                                 {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"},  # a one-task SLURM job
                                 # An salloc shell or a notebook kernel in an allocation: the job, no job step.
                                 {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"},
                                 # Open MPI's per-rank variables without the launcher's URI JAX reads.
                                 {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},
                                 # Asked for explicitly, one process stays one inside a job step too.
                                 {**SLURM_STEP_OF_4, "PHI_JAX_NUM_PROCESSES": "1"}])
def test_one_process_needs_no_coordinator(monkeypatch, no_cluster, env):
  from phi_jax.sharding import distributed
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  distributed.initialize()
  distributed.initialize()  # a second call (a recipe's next stage) does nothing
  assert no_cluster == []


def test_a_cluster_jax_detects_starts_without_a_coordinator(monkeypatch, no_cluster):
  """On SLURM (or a TPU pod) JAX finds the processes itself; stray PHI_JAX_* settings do not stop it."""
  from phi_jax.sharding import distributed
  switched = []  # not applied: no gloo switch in this test process
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: switched.append(a))
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  for name, value in {**SLURM_STEP_OF_4, "PHI_JAX_NUM_PROCESSES": "4"}.items():
    monkeypatch.setenv(name, value)
  distributed.initialize()
  distributed.initialize()  # once only: jax.distributed refuses a second start
  assert no_cluster == [((None, 4, None), {})]  # the agreeing count passed on, the rest left to JAX
  assert switched == [("jax_cpu_collectives_implementation", "gloo")]  # its processes gather over CPU collectives


def test_a_program_that_started_jax_distributed_itself_is_left_as_it_is(monkeypatch, no_cluster):
  """A script that called jax.distributed.initialize() before phi_jax's start-up (with the launcher's settings in
  its environment): no second start, which jax.distributed refuses."""
  from phi_jax.sharding import distributed
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: True)
  for name, value in {"PHI_JAX_COORDINATOR_ADDRESS": "host0:1234", "PHI_JAX_NUM_PROCESSES": "2",
                      "PHI_JAX_PROCESS_ID": "1"}.items():
    monkeypatch.setenv(name, value)
  distributed.initialize()
  assert no_cluster == []


@pytest.mark.parametrize("given", ["env", "args"])
def test_a_coordinator_address_starts_every_process_with_its_own_id(monkeypatch, no_cluster, given):
  """jax.distributed gets (address, number of processes, this process's id), from arguments or the environment, and
  CPU collectives switch to gloo first."""
  from phi_jax.sharding import distributed
  switched = []
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: switched.append(a))
  if given == "env":
    for name, value in {"PHI_JAX_COORDINATOR_ADDRESS": "host0:1234", "PHI_JAX_NUM_PROCESSES": "4",
                        "PHI_JAX_PROCESS_ID": "3"}.items():
      monkeypatch.setenv(name, value)
    distributed.initialize()
  else:
    distributed.initialize("host0:1234", num_processes=4, process_id=3)
  assert no_cluster == [(("host0:1234", 4, 3), {})]
  assert switched == [("jax_cpu_collectives_implementation", "gloo")]


@pytest.mark.parametrize("kwargs", [{"num_processes": 2}, {"process_id": 1}])
def test_a_coordinator_address_without_the_process_count_and_id_is_refused(monkeypatch, no_cluster, kwargs):
  from phi_jax.sharding import distributed
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)  # no gloo switch in this test process
  with pytest.raises(ValueError, match="needs num_processes and process_id too"):
    distributed.initialize("host0:1234", **kwargs)
  assert no_cluster == []


@pytest.mark.parametrize("env,kwargs", [
    ({}, {"coordinator_address": "host0:1234", "num_processes": 1}),
    ({"PHI_JAX_COORDINATOR_ADDRESS": "host0:1234", "PHI_JAX_NUM_PROCESSES": "1"}, {}),
    # Arguments win over a launcher's inherited settings.
    ({"PHI_JAX_COORDINATOR_ADDRESS": "host0:1234", "PHI_JAX_NUM_PROCESSES": "2", "PHI_JAX_PROCESS_ID": "1"},
     {"num_processes": 1, "process_id": 0}),
    ({"PHI_JAX_COORDINATOR_ADDRESS": "host0:1234"}, {"coordinator_address": ""}),  # "" is no coordinator
])
def test_an_explicit_single_process_stays_one_with_a_coordinator_address_set(monkeypatch, no_cluster, env, kwargs):
  from phi_jax.sharding import distributed
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(**kwargs)
  assert no_cluster == []


@pytest.mark.parametrize("env,kwargs,expected", [
    # An address alone: JAX takes the process count and id from the job step.
    ({**SLURM_STEP_OF_4, "PHI_JAX_COORDINATOR_ADDRESS": "host0:1234"}, {}, ("host0:1234", None, None)),
    ({**SLURM_STEP_OF_4}, {"num_processes": 4, "process_id": 1}, (None, 4, 1)),
    ({"TPU_WORKER_HOSTNAMES": "a,b", "PHI_JAX_NUM_PROCESSES": "2"}, {}, (None, 2, None)),
])
def test_explicit_settings_reach_jax_in_a_cluster_it_detects(monkeypatch, no_cluster, env, kwargs, expected):
  from phi_jax.sharding import distributed
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)  # no gloo switch in this test process
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  distributed.initialize(**kwargs)
  assert no_cluster == [(expected, {})]


@pytest.mark.parametrize("tasks_per_node,local_devices,backend,gpus,warned", [
    ("1(x4)", 1, "gpu", {"SLURM_GPUS_ON_NODE": "8"}, True),  # one task on each of 4 nodes: JAX pins each to one GPU
    ("1(x4)", 1, "gpu", {"SLURM_JOB_GPUS": "0,1,2,3"}, True),
    ("1(x4)", 1, "gpu", {}, True),  # the node's GPUs unsaid: they may sit idle
    ("1(x4)", 1, "gpu", {"SLURM_GPUS_ON_NODE": "1"}, False),  # one GPU per node: one task per node is right
    ("2(x2)", 1, "gpu", {"SLURM_GPUS_ON_NODE": "2"}, False),  # one task per GPU on 2-GPU nodes: as meant
    ("1(x4)", 8, "gpu", {"SLURM_GPUS_ON_NODE": "8"}, False),  # the process sees every GPU of its node
    ("1(x4)", 1, "cpu", {}, False),
])
def test_a_slurm_step_of_one_task_per_gpu_node_is_warned_about(monkeypatch, no_cluster, caplog, tasks_per_node,
                                                               local_devices, backend, gpus, warned):
  """Under Slurm JAX gives each task the GPU of its SLURM_LOCALID: one task per 8-GPU node trains on one GPU."""
  from phi_jax.sharding import distributed
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
  monkeypatch.setattr(distributed.jax, "local_device_count", lambda: local_devices)
  monkeypatch.setattr(distributed.jax, "default_backend", lambda: backend)
  for name in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS"):
    monkeypatch.delenv(name, raising=False)
  for name, value in {**SLURM_STEP_OF_4, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **gpus}.items():
    monkeypatch.setenv(name, value)
  with caplog.at_level(logging.WARNING):
    distributed.initialize()
  assert len(no_cluster) == 1
  assert ("--ntasks-per-node" in caplog.text) == warned


@pytest.mark.parametrize("env,kwargs,message", [
    ({"PHI_JAX_NUM_PROCESSES": "2", "PHI_JAX_PROCESS_ID": "1"}, {}, "num_processes=2 .*SLURM_NTASKS=4"),
    ({}, {"num_processes": 4, "process_id": 2}, "process_id=2 .*SLURM_PROCID=1"),
])
def test_settings_that_disagree_with_the_slurm_step_are_refused(monkeypatch, no_cluster, env, kwargs, message):
  from phi_jax.sharding import distributed
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
  for name, value in {**SLURM_STEP_OF_4, **env}.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)
  assert no_cluster == []


@pytest.mark.parametrize("env,kwargs,message", [
    ({"PHI_JAX_NUM_PROCESSES": ""}, {}, "PHI_JAX_NUM_PROCESSES='' is not an integer"),
    ({"PHI_JAX_PROCESS_ID": "one"}, {}, "PHI_JAX_PROCESS_ID='one' is not an integer"),
    ({"PHI_JAX_NUM_PROCESSES": "0"}, {}, "PHI_JAX_NUM_PROCESSES=0 .*at least 1"),
    ({"PHI_JAX_COORDINATOR_ADDRESS": "host0:1234", "PHI_JAX_NUM_PROCESSES": "0", "PHI_JAX_PROCESS_ID": "0"}, {},
     "PHI_JAX_NUM_PROCESSES=0 .*at least 1"),
    ({"PHI_JAX_NUM_PROCESSES": "2", "PHI_JAX_PROCESS_ID": "2"}, {}, "PHI_JAX_PROCESS_ID=2 .*0 to 1"),
    ({"PHI_JAX_PROCESS_ID": "-1"}, {}, "PHI_JAX_PROCESS_ID=-1 .*at least 0"),
    ({}, {"num_processes": 0}, "num_processes=0 .*at least 1"),
    ({}, {"num_processes": 1, "process_id": 1}, "process_id=1 .*0 to 0"),
])
def test_malformed_process_settings_name_the_setting(monkeypatch, no_cluster, env, kwargs, message):
  from phi_jax.sharding import distributed
  monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)
  assert no_cluster == []


def test_allgather_json_on_one_process():
  from phi_jax.sharding import distributed
  assert distributed.allgather_json({"a": ["b", 1]}) == [{"a": ["b", 1]}]


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _worker(sys.argv[1])


def test_a_position_the_same_on_every_process_restores_onto_any_number_of_them(monkeypatch):
  import jax

  from phi_jax.train import checkpoint

  position = {"position": 4, "rollouts": 2, checkpoint.GLOBAL_DATA_STATE: True}
  saved_by_two = {"process_count": 2, "per_process": [position, dict(position)]}
  saved_by_one = dict(position)
  unmarked = {"process_count": 2, "per_process": [{"position": 4}, {"position": 4}]}  # two shards, each at 4
  differing = {"process_count": 2, "per_process": [position, dict(position, rollouts=3)]}
  for count in (1, 2, 3):
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(jax, "process_index", lambda: count - 1)
    assert checkpoint._own_data_state("ckpt", saved_by_two) == position
    assert checkpoint._own_data_state("ckpt", saved_by_one) == position
    if count != 2:
      for saved in (unmarked, differing):
        with pytest.raises(checkpoint.IncompatibleCheckpointError, match="same number of processes"):
          checkpoint._own_data_state("ckpt", saved)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match="one-process run"):
    checkpoint._own_data_state("ckpt", {"position": 4})  # a one-process position of a shard, on two processes
