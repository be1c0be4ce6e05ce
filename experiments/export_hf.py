"""Writes a finished run's final params (W/params) as a transformers checkpoint: config.json, safetensors and the
run's tokenizer, loadable with `AutoModelForCausalLM.from_pretrained`.

  python experiments/export_hf.py --init_from runs/mini_sft [--out runs/mini_sft/hf] [--overwrite]

An --out that already holds a checkpoint (an earlier export) is replaced only with --overwrite; one that is the
run's own model.hf_path, train.init_from or data.tokenizer is refused.

These are the files `train.export_hf=True` writes at the end of a one-process run. A run on several processes
(multi-host) cannot write them itself, since no process holds every parameter: run this afterwards in one process
on a machine with host memory for the model (the parameters are read onto this process's devices).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gin  # noqa: E402

import common  # noqa: E402  (gin configurables shared by every entry script)
import gin_bindings  # noqa: E402
import run_files  # noqa: E402
import rollouts  # noqa: E402

log = logging.getLogger("phi_jax.export_hf")

# Where the run read its starting weights and tokenizer: exporting over one would replace them (save_hf replaces the
# weights and config of a directory it writes into, save_tokenizer its tokenizer files).
_RUN_SOURCES = ("model.hf_path", "train.init_from", "data.tokenizer")


def check_out(out: str, overwrite: bool) -> None:
  """Refuses an --out that is one of the run's sources (its config.gin's, read through gin), and one that holds a
  checkpoint already unless `overwrite`."""
  where = os.path.realpath(out)
  for name in _RUN_SOURCES:
    source = gin_bindings.bound_or_none(name)
    if isinstance(source, str) and os.path.realpath(source) == where:
      raise ValueError(f"--out={out!r} is the run's {name}={source!r}: exporting there would replace the files the "
                       "run started from; choose another --out")
  names = sorted(os.listdir(out)) if os.path.isdir(out) else []
  held = [n for n in names if n == "config.json" or n.endswith(".safetensors")]
  if held and not overwrite:
    raise ValueError(f"--out={out!r} already holds a transformers checkpoint ({', '.join(held[:3])}): pass "
                     "--overwrite to replace it, or choose another --out")


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--init_from", required=True, help="a finished run's workdir (with params/ and config.gin)")
  parser.add_argument("--out", help="output directory (default: INIT_FROM/hf)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the checkpoint an --out already holds (an earlier export)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding 'k=v' (repeatable), after the run's own config.gin")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
  run_files.check_policy_dir(args.init_from)  # a skipped recipe stage names the stage whose params it kept
  if not os.path.isdir(os.path.join(args.init_from, "params")):
    run_files.check_not_unfinished_run(args.init_from)
    raise ValueError(f"{args.init_from} has no params/: point --init_from at a finished run's workdir")
  gin.clear_config()
  gin_bindings.parse_gin_for_checkpoint(args.init_from, [], args.gin_param)
  out = args.out or os.path.join(args.init_from, "hf")
  check_out(out, args.overwrite)  # before the params load: a refused --out costs nothing
  the_mesh = common.mesh()
  config, params, tokenizer = rollouts.load_policy(args.init_from, the_mesh)
  run_files.export_hf(out, config, params, tokenizer, common.data()["system_prompt"])
  log.info("wrote %s", out)
  return out


if __name__ == "__main__":
  main()
