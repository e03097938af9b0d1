"""The notebooks run end to end (shortened) and the second-order optimizers lower the loss."""

import json
import math
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def stdout_of(cell):
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.output_type == "stream" and o.get("name") == "stdout")


def execute(name, monkeypatch):
  """The notebook ``name`` run with STEPS = 40 (after its 'parameters' cell); its code cells."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "expected exactly one cell tagged 'parameters'"
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell("STEPS = 40"))

  # The kernel inherits this environment: import this checkout (so the install cell is a no-op)
  # and run on the CPU like the other tests.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # "python3" is ipykernel's native kernel: with no such kernelspec registered, jupyter_client
  # falls back to ipykernel in this interpreter.
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError on any failing cell
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code_cells:
    assert not [o for o in cell.outputs if o.output_type == "error"]
  return code_cells


def test_quickstart_notebook(monkeypatch):
  code_cells = execute("quickstart.ipynb", monkeypatch)
  summary = next(stdout_of(c) for c in code_cells if "final train loss" in stdout_of(c))
  assert "SGD" in summary and "Eva" in summary, summary

  results = json.loads(stdout_of(code_cells[-1]).strip().splitlines()[-1])
  assert set(results) == {"sgd", "eva"}, results
  for name in ("sgd", "eva"):
    assert math.isfinite(results[name]["final_loss"]), results
  eva = results["eva"]
  assert math.isfinite(eva["initial_loss"]), results
  assert eva["final_loss"] < eva["initial_loss"], results


def test_nnx_quickstart_notebook(monkeypatch):
  code_cells = execute("nnx_quickstart.ipynb", monkeypatch)
  coverage = next(stdout_of(c) for c in code_cells if "kernel-bearing" in stdout_of(c))
  assert "2 of 2 kernel-bearing parameters preconditioned" in coverage, coverage
  results = json.loads(stdout_of(code_cells[-1]).strip().splitlines()[-1])
  assert set(results) == {"sgd", "eva", "k-fac"}, results
  for name in ("eva", "k-fac"):
    assert results[name]["final_loss"] < results[name]["initial_loss"], results
