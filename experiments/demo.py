"""The demo: the whole Phi-4-mini-reasoning recipe on a tiny model and the embedded word-problem task, on a CPU.

    make demo        # == python experiments/demo.py --workdir runs/demo
    python experiments/demo.py --workdir /tmp/demo --quick     # the 1-2 minute smoke version

A base model trained on direct answers, then packed mid-training on reasoning traces, SFT, rollout DPO and GRPO,
each evaluated on the held-out test split with the verifier. Needs no downloads. Prints progress per stage and the
stage table at the end; writes runs/demo/summary.json ({"stages": [{"name", "accuracy", ...}]}), runs/demo/report.md
and the plots next to it. Re-running resumes (finished stages are skipped); --fresh starts over. See
experiments/recipe.py for the stages and experiments/configs/recipe_tiny/ for their settings.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recipe  # noqa: E402

if __name__ == "__main__":
  recipe.main(sys.argv[1:])
