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


def execute(name, monkeypatch, overrides="STEPS = 40"):
  """The notebook ``name`` run with the assignments ``overrides`` (a cell inserted after its
  'parameters' cell); its code cells."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "expected exactly one cell tagged 'parameters'"
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(overrides))

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


def shared_data(*relative):
  """``$EVA_OPTAX_DATA``, skipping the test unless it holds every file of ``relative`` (the
  notebooks would download them otherwise, and tests never download)."""
  root = os.environ.get("EVA_OPTAX_DATA")
  missing = [r for r in relative if not root or not (pathlib.Path(root) / r).is_file()]
  if missing:
    pytest.skip(f"needs $EVA_OPTAX_DATA holding {', '.join(missing)}"
                f" (EVA_OPTAX_DATA={root!r})")
  return pathlib.Path(root)


def test_shakespeare_char_notebook(monkeypatch):
  root = shared_data("tinyshakespeare/input.txt")
  # Compiling five optimizers' steps dominates this short run; XLA's optimizations would cost more
  # time than they save.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  code_cells = execute("shakespeare_char.ipynb", monkeypatch, overrides=(
      "STEPS, WIDTH, DEPTH, HEADS = 30, 32, 2, 2\n"
      "EVAL_EVERY, VAL_WINDOWS, SAMPLE_CHARS = 10, 32, 40\n"
      f"DATA_DIR = {str(root)!r}"))
  coverage = next(stdout_of(c) for c in code_cells if "kernel-bearing" in stdout_of(c))
  # Every Dense and attention kernel and the head; the two embeddings are first-order by design.
  assert "7 of 9 kernel-bearing parameters preconditioned" in coverage, coverage

  results = json.loads(stdout_of(code_cells[-1]).strip().splitlines()[-1])
  assert set(results) == {"adamw", "muon", "eva", "k-fac", "shampoo"}, results
  vocabulary = set((root / "tinyshakespeare" / "input.txt").read_text())
  for name, run in results.items():
    assert math.isfinite(run["final_val_loss"]), (name, run)
    assert run["final_val_loss"] < run["initial_val_loss"], (name, run)
    assert len(run["sample"]) == 40 and set(run["sample"]) <= vocabulary, (name, run)


def test_cifar10_resnet_notebook(monkeypatch):
  root = shared_data(*[f"cifar10/cifar10_train_{i}.npz" for i in range(5)],
                     "cifar10/cifar10_test.npz")
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # as above: compilation dominates
  # K-FAC's convolution factors would double the run; the shakespeare test covers K-FAC.
  code_cells = execute("cifar10_resnet.ipynb", monkeypatch, overrides=(
      "STEPS, BATCH, EVAL_EVERY, TRAIN_SUBSET, TEST_SUBSET = 10, 32, 5, 512, 256\n"
      f"TRAIN_KFAC, DATA_DIR = False, {str(root)!r}"))
  coverage = next(stdout_of(c) for c in code_cells if "kernel-bearing" in stdout_of(c))
  assert "22 of 22 kernel-bearing parameters preconditioned" in coverage, coverage

  results = json.loads(stdout_of(code_cells[-1]).strip().splitlines()[-1])
  assert set(results) == {"sgd-nesterov", "eva"}, results
  for name, run in results.items():
    for key in ("initial_test_acc", "final_test_acc"):
      assert 0.0 <= run[key] <= 1.0, (name, run)
    for key in ("initial_train_loss", "final_train_loss"):
      assert math.isfinite(run[key]), (name, run)
  assert results["eva"]["final_train_loss"] < results["eva"]["initial_train_loss"], results
