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
W/config.gin and W/checkpoints/; the final parameters go to W/params/ (the next stage's `train.init_from`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (gin configurables shared by every entry script)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
  parser.add_argument("--gin_param", action="append", default=[], help="gin binding 'k=v' (repeatable)")
  parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, config.gin")
  parser.add_argument("--dry_run", action="store_true",
                      help="compile the step ahead of time from abstract shapes and print per-device memory")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  common.parse_gin(args.gin_file, args.gin_param)
  if args.dry_run:
    report = common.dry_run()
    print(json.dumps(report, indent=1))
    return report
  return common.run_training(args.workdir)


if __name__ == "__main__":
  main()
