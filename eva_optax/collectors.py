"""Collectors: the per-layer statistics a preconditioner needs and their running averages.

A *collector* owns the statistics part of the optimizer state (DESIGN §3). The captured
statistics of one step (the ``curvature`` pytree) enter the running averages here; the
preconditioner only ever sees the averaged values.

The curvature pytree
--------------------
``curvature`` is a nested dict keyed by module path exactly like the ``params`` tree of the
layers it describes, with one statistics record per layer in place of the layer's parameter
dict. For ``params = {"Encoder_0": {"Dense_0": {"kernel": K, "bias": b}}}`` it is
``{"Encoder_0": {"Dense_0": KroneckerVectors(a=..., g=...)}}``. Users of other frameworks can
build it by hand from these records.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from eva_optax import layers


class KroneckerVectors(NamedTuple):
  """Eva's per-layer statistics (DESIGN §4), float32, in per-example units.

  Attributes:
    a: ``(d_in,)`` mean layer input ā over batch, sequence and (conv) output positions; for a
      conv the mean im2col patch ordered like the ``[*kernel_size, c_in]`` kernel rows. No bias
      entry: the 1 is appended by the optimizer when the layer has a bias.
    g: ``(d_out,)`` mean per-example output gradient ḡ = B · mean(∂L/∂y) over the same rows, for
      a loss L = mean_i ℓ_i over B examples. For a Dense layer with bias, ḡ is the bias gradient.
  """

  a: jax.Array
  g: jax.Array


class Collector(NamedTuple):
  """Running statistics of one kind, per layer.

  Attributes:
    kind: the statistics record type expected in ``curvature`` (e.g. :class:`KroneckerVectors`).
    init: ``kernel -> record`` of zeros shaped for a kernel ``[..., d_out]``.
    update: ``(old, new, count) -> record``, the running average.
    with_bias: ``record -> record`` augmented for a layer with a bias (the bias row of Ĝ).
  """

  kind: type
  init: Callable[[jax.Array], NamedTuple]
  update: Callable[[NamedTuple, NamedTuple, jax.Array], NamedTuple]
  with_bias: Callable[[NamedTuple], NamedTuple]


def running_average(old, new, count: jax.Array, stat_decay: float):
  """The reference's convention: ``m = new`` on the first step (count 0), then
  ``m ← stat_decay · new + (1 − stat_decay) · m`` — ``stat_decay`` weights the *new* value.

  A record with a non-finite entry (a bad batch) leaves ``old`` as it was, so one bad step
  cannot poison the statistics for good (its update is still non-finite, which
  ``optax.apply_if_finite`` can skip).
  """
  first = count == 0
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(n)) for n in jax.tree.leaves(new)]))
  return jax.tree.map(
      lambda o, n: jnp.where(finite, jnp.where(first, n, stat_decay * n + (1.0 - stat_decay) * o),
                             o), old, new)


def kronecker_vectors(stat_decay: float) -> Collector:
  """Collector of Eva's vectors ā, ḡ (O(d_in + d_out) state per layer)."""
  def init(kernel):
    shape = jnp.shape(kernel)
    return KroneckerVectors(jnp.zeros((math.prod(shape[:-1]),), jnp.float32),
                            jnp.zeros((shape[-1],), jnp.float32))

  def update(old, new, count):
    new = KroneckerVectors(*(jnp.asarray(v, jnp.float32) for v in new))
    return running_average(old, new, count, stat_decay)

  return Collector(KroneckerVectors, init, update, vectors_with_bias)


def vectors_with_bias(stats: KroneckerVectors) -> KroneckerVectors:
  """ā with the bias input 1 appended (its mean is 1)."""
  return stats._replace(a=jnp.append(stats.a, 1.0))


def flatten_curvature(curvature) -> dict[layers.LayerName, NamedTuple]:
  """``{"A/B": record}`` from the nested curvature dict (records are the non-mapping nodes)."""
  flat = {}

  def walk(node, path):
    if isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, path + (str(key),))
    else:
      flat[layers.layer_name(path)] = node

  walk(curvature, ())
  return flat


def unflatten_curvature(flat: Mapping[layers.LayerName, NamedTuple]) -> dict:
  """Inverse of :func:`flatten_curvature` (a model that is a single layer maps to its record)."""
  if "" in flat:
    return flat[""]
  nested: dict = {}
  for name, record in flat.items():
    *parents, leaf = name.split("/")
    node = nested
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = record
  return nested
