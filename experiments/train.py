"""Runs one training stage from gin files; re-running the same command on the same workdir resumes.

    python experiments/train.py --gin_file=experiments/configs/midtrain_tiny.gin --workdir=runs/midtrain_tiny
    # a mesh over 4 devices (on a CPU, XLA simulates them with the flag)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/train.py \
        --gin_file=experiments/configs/midtrain_tiny.gin --gin_param='train.num_steps=50' \
        --gin_param='mesh.shape={"data": 2, "fsdp": -1}' --workdir=runs/mt
    # plan before you pay: compile the step for a mesh from abstract shapes, print per-device memory, no weights
    python experiments/train.py --gin_file=experiments/configs/midtrain_tiny.gin --dry_run \
        --gin_param='model.preset="phi-4"' --gin_param='data.seq_len=4096' --workdir=/tmp/plan

Multi-host: run the same command on every host; set PHI_JAX_COORDINATOR_ADDRESS / PHI_JAX_NUM_PROCESSES /
PHI_JAX_PROCESS_ID (or run under SLURM / a TPU pod, which JAX detects). Every run writes W/metrics.jsonl,
W/config.gin (its bindings: `--gin_file=W/config.gin` reruns it; a command without --gin_file is refused) and
W/checkpoints/; the final parameters go to W/params/ (the next stage's `train.init_from`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (gin configurables shared by every entry script)
import gin_bindings  # noqa: E402


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
  parser.add_argument("--gin_param", action="append", default=[], help="gin binding 'k=v' (repeatable)")
  parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, config.gin")
  parser.add_argument("--dry_run", action="store_true",
                      help="compile the step ahead of time from abstract shapes and print per-device memory")
  return parser.parse_args(argv)


def check_gin_files(gin_files, workdir: str) -> None:
  """Refuses a command without --gin_file, which gin reported only as a missing train.num_steps. A rerun does not
  replay W/config.gin unasked (what runs is what the command names): the error names it as the --gin_file to give."""
  if gin_files:
    return
  recorded = os.path.join(workdir, "config.gin")
  if os.path.isfile(recorded):
    raise ValueError(f"no --gin_file given: a run's settings come from its gin files, none of which is read "
                     f"unless named. To rerun (resume) the run in {workdir} with the bindings it recorded, give "
                     f"--gin_file={recorded}")
  raise ValueError("no --gin_file given: give the --gin_file the run was started with (e.g. "
                   "--gin_file=experiments/configs/midtrain_tiny.gin)")


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  check_gin_files(args.gin_file, args.workdir)
  gin_bindings.parse_gin(args.gin_file, args.gin_param)
  if args.dry_run:
    report = common.dry_run()
    print(json.dumps(report, indent=1))
    return report
  return common.run_training(args.workdir)


if __name__ == "__main__":
  main()
