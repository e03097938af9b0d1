"""Which parameters are preconditioned, which pass through and why, and whether the statistics
are healthy: the coverage report (DESIGN §2, "coverage is visible")."""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import numpy as np

from eva_optax import collectors, layers

# ‖ḡ‖ below this (per-example units) means Eva's rank-one curvature is numerically zero: a
# layer followed by BatchNorm in training mode, an attention key projection.
VANISHING = 1e-6
_SECOND_MOMENTS = ("scale", "bias")  # never kernel-bearing, even when stacked to rank 2


class Coverage(NamedTuple):
  """One kernel-bearing parameter (rank ≥ 2, not a bias or norm scale).

  Attributes:
    parameter: its path, ``"Block_0/Dense_1/kernel"``.
    shape: its shape.
    preconditioned: whether a curvature record covers its layer.
    detail: the statistics kinds and the layer's layout, or why it passes through.
    health: ``""`` or a warning about its statistics (e.g. ‖ḡ‖ ≈ 0).
  """

  parameter: str
  shape: tuple
  preconditioned: bool
  detail: str
  health: str


def _by_kind(curvature) -> dict[str, dict]:
  """``{statistics name: {layer: record}}`` from one tree or a dict of trees."""
  names = set(collectors.RECORDS)
  if isinstance(curvature, Mapping) and curvature and set(curvature) <= names:
    return {kind: collectors.flatten_curvature(tree) for kind, tree in curvature.items()}
  flat = collectors.flatten_curvature(curvature or {})
  kinds = {r: k for k, r in collectors.RECORDS.items()}
  out: dict[str, dict] = {}
  for name, record in flat.items():
    out.setdefault(kinds.get(type(record), type(record).__name__), {})[name] = record
  return out


def _health(records: Mapping[str, object]) -> str:
  """A warning when a record's output side vanishes (host values only; tracers are skipped)."""
  warnings = []
  for record in records.values():
    if isinstance(record, (collectors.KroneckerVectors, collectors.OutputVectors)):
      g = record.g
      if isinstance(g, jax.core.Tracer):
        continue
      norms = np.linalg.norm(np.asarray(g, np.float64).reshape(-1, np.shape(g)[-1]), axis=-1)
      if norms.min() < VANISHING:
        warnings.append(f"‖ḡ‖ = {norms.min():.1e} ≈ 0: Eva's correction is off here")
    if isinstance(record, collectors.KroneckerFactors) and not isinstance(record.g,
                                                                         jax.core.Tracer):
      if np.min(np.trace(np.asarray(record.g), axis1=-2, axis2=-1)) <= 0:
        warnings.append("G = 0: no output gradient reached this layer")
  return "; ".join(dict.fromkeys(warnings))


def coverage(params, curvature, info=None) -> list[Coverage]:
  """Every kernel-bearing parameter of ``params``: preconditioned by which statistics, or
  passed through and why.

  Args:
    params: the parameter tree given to the optimizer (or an ``nnx.State`` of ``nnx.Param``).
    curvature: the capture's statistics (one tree, or a dict of trees keyed by statistics
      name), e.g. the third output of :func:`eva_optax.flax.value_and_grad`.
    info: optional :class:`~eva_optax.flax.CaptureInfo` (``capture.describe(params, *batch)``):
      adds layouts and the reasons layers were skipped (excluded, embedding lookups).

  Returns:
    One :class:`Coverage` per parameter of rank ≥ 2 other than biases and norm scales, in
    ``params`` order.
  """
  kinds = _by_kind(curvature)
  skipped = dict(getattr(info, "skipped", {}) or {})
  layouts = dict(getattr(info, "layouts", {}) or {})
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = layers.dict_path(path) or layers.key_path_names(path)
    if np.ndim(leaf) < 2 or names[-1] in _SECOND_MOMENTS:
      continue
    layer = layers.layer_name(names[:-1])
    records = {k: tree[layer] for k, tree in kinds.items() if layer in tree}
    if records and names[-1] == "kernel":
      layout = layouts.get(layer)
      detail = ", ".join(records) + ("" if layout is None else
                                     f" (stack axes {layout.stacked_axes}, output axes "
                                     f"{layout.output_axes})")
      rows.append(Coverage("/".join(names), np.shape(leaf), True, detail, _health(records)))
      continue
    reason = skipped.get(layer) or (
        "not captured: no supported layer call uses it (a custom module, or not applied in "
        "the loss)" if names[-1] == "kernel" else "not a layer kernel")
    rows.append(Coverage("/".join(names), np.shape(leaf), False, f"passed through: {reason}",
                         ""))
  return rows


def coverage_report(params, curvature, info=None) -> str:
  """:func:`coverage` as a text table (one line per parameter, then a summary line)."""
  rows = coverage(params, curvature, info)
  width = max([len(r.parameter) for r in rows] + [9])
  lines = [f"{'parameter':<{width}}  {'shape':<16} status"]
  for r in rows:
    status = "preconditioned: " + r.detail if r.preconditioned else r.detail
    health = f"  [{r.health}]" if r.health else ""
    lines.append(f"{r.parameter:<{width}}  {str(tuple(r.shape)):<16} {status}{health}")
  done = sum(r.preconditioned for r in rows)
  lines.append(f"{done} of {len(rows)} kernel-bearing parameters preconditioned.")
  return "\n".join(lines)
