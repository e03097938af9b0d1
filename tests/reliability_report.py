"""Prints the reliability matrix of benchmarks/RELIABILITY.md (issue 15), per optimizer.

    EVA_OPTAX_DATA=/work/shared/data JAX_PLATFORMS=cpu python tests/reliability_report.py

The same cases as tests/test_reliability.py (which samples them with hypothesis), here on a
fixed grid: every bad value × {one entry, every entry} of each target (gradients, curvature,
K-BFGS's second pass), two clean steps before, RECOVERY_STEPS after; every misuse case with a
representative bad argument; an in-process orbax round trip with the template (the fresh-process
round trip is the test's); donation of params and a fresh state.
"""

from __future__ import annotations

import math
import re
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import test_reliability as t  # noqa: E402

EXAMPLES = {"learning_rate": math.nan, "decay_outside_unit_interval": -0.5,
            "integer_gradients": jnp.int32, "integer_parameters": jnp.int32,
            "integer_curvature": jnp.int32, "integer_second_pass": jnp.int32}


def bad_numbers(name: str) -> tuple[int, int, int, list]:
  s = t.setup(name)
  targets = [k for k in sorted(s.clean) if k != "second" or name in t.SECOND_PASS]
  # One entry of the first leaf, or every entry of every leaf, of each target.
  cases = [t.Fault(2, value, target, *spot) for target in targets
           for spot in ((0, 0), (None, None)) for value in t.BAD_VALUES]
  finite = recovered = 0
  failures = []
  for fault in cases:
    outcome = t.fault_outcome(s, fault)
    finite += outcome.finite
    recovered += outcome.recovered
    if not (outcome.finite and outcome.recovered):
      note = ""
      if name in t.GRADIENT_SCALED and fault.target == "grads":
        clipped = t.fault_outcome(t.setup(name, clip=True), fault)
        note = (f" (behind optax.clip_by_global_norm(1.0): finite={clipped.finite}, "
                f"recovered={clipped.recovered})")
      failures.append(f"{fault.value:g} in {'all of' if fault.leaf is None else 'one entry of'} "
                      f"{fault.target}: finite={outcome.finite}, {outcome.detail}{note}")
  return len(cases), finite, recovered, failures


def misuse(name: str) -> tuple[int, int, int, int, list]:
  s = t.setup(name)
  clear = unhelpful = silent = 0
  notes = []
  cases = [c for c, m in t.MISUSE.items() if name in m.applies]
  for case in cases:
    case_spec = t.MISUSE[case]
    try:
      case_spec.run(s, EXAMPLES.get(case))
    except Exception as error:  # pylint: disable=broad-except
      if isinstance(error, case_spec.error) and re.search(case_spec.match, str(error)):
        clear += 1
      else:
        unhelpful += 1
        notes.append(f"{case}: {type(error).__name__}: {str(error)[:120]}")
      continue
    silent += 1
    notes.append(f"{case}: silent")
  return len(cases), clear, unhelpful, silent, notes


def checkpoint_bit_identical(name: str) -> bool:
  s = t.setup(name)
  params, state, _ = t.run(s, t.CHECKPOINT_AT)
  with tempfile.TemporaryDirectory() as directory:
    path = pathlib.Path(directory) / "checkpoint"
    t._save(path, {"params": params, "state": state})  # pylint: disable=protected-access
    template = {"params": jax.eval_shape(lambda: s.params),
                "state": jax.eval_shape(s.tx.init, s.params)}
    restored = t._restore(path, template)  # pylint: disable=protected-access
  expected = jax.device_get(t.run(s, t.CONTINUE, params, state)[:2])
  resumed = jax.device_get(t.run(s, t.CONTINUE, restored["params"], restored["state"])[:2])
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed),
                                                   jax.tree.leaves(expected)))


def donation(name: str) -> bool:
  try:
    for jit_init in (False, True):
      t.test_params_and_a_fresh_state_can_be_donated(name, jit_init)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def main() -> None:
  rows, notes = [], []
  for name in t.NAMES:
    total, finite, recovered, failures = bad_numbers(name)
    cases, clear, unhelpful, silent, misuse_notes = misuse(name)
    rows.append(f"| {name} | {finite}/{total} | {recovered}/{total} | {clear}/{cases} | "
                f"{unhelpful} | {silent} | {'yes' if checkpoint_bit_identical(name) else 'NO'} | "
                f"{'yes' if donation(name) else 'NO'} |")
    notes += [f"- {name}: {n}" for n in failures + misuse_notes]
    print(rows[-1], flush=True)
  print("\n| optimizer | bad numbers finite or skipped | recovered | misuse clear | unhelpful "
        "| silent | checkpoint bit-identical | donation |\n|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  print("\n".join(notes) or "(no failures)")


if __name__ == "__main__":
  main()
