"""The notebooks run top to bottom without errors (executed with nbclient in this interpreter's kernel).

The recipe walkthrough runs in `test_recipe.py`, on the smoke run that module already makes."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))
RUN_ELSEWHERE = {"recipe_walkthrough.ipynb"}

pytestmark = pytest.mark.slow


def execute_notebook(name):
  """Runs notebooks/<name> in a fresh kernel (which inherits os.environ); fails on any cell error."""
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
  assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
  return nb


def test_every_notebook_is_executed_by_the_suite():
  assert RUN_ELSEWHERE <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(set(NOTEBOOKS) - RUN_ELSEWHERE))
def test_notebook_runs(name):
  execute_notebook(name)
