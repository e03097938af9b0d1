"""Layer views shared by the capture front ends: how a matmul, an einsum or a convolution call
maps to :class:`~eva_optax.layers.LayerView` rows, and the errors for what cannot be captured.

Framework-neutral: the front ends read their modules' attributes and call these."""

from __future__ import annotations

import fnmatch
from typing import Callable, Sequence

from flax.linen.linear import canonicalize_padding

from eva_optax import layers


def fail(name: str, module, what: str, fix: str):
  """Raises ``NotImplementedError`` naming the layer, the reason, the fix and ``exclude``."""
  raise NotImplementedError(
      f"eva_optax: layer '{name}' ({type(module).__name__}) uses {what}, which the Kronecker "
      f"statistics do not support. {fix} Or leave it first-order with "
      f"exclude=[{name!r}] in the capture's value_and_grad.")


def as_tuple(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _spatial(value, rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  return (value,) * rank if isinstance(value, int) else tuple(value)


def matmul(x, contract: Sequence[int], output_axes: int, has_bias: bool) -> layers.LayerView:
  """Contracting axes ``contract`` of ``x`` (kernel order) moved last; the rest keep order."""
  keep = tuple(a for a in range(x.ndim) if a not in contract)
  perm = keep + tuple(contract)
  return layers.LayerView(None if perm == tuple(range(x.ndim)) else perm, len(contract),
                          None, output_axes, None, has_bias)


def general(name, module, x, axis, output_axes: int, has_bias: bool) -> layers.LayerView:
  """A DenseGeneral/LinearGeneral: contracting ``axis`` (sorted, Flax's kernel order)."""
  axis = tuple(sorted(a % x.ndim for a in as_tuple(axis)))
  if 0 in axis and x.ndim > len(axis):
    fail(name, module, f"axis={axis} (contracting the leading, batch axis)",
         "Keep the batch on the leading axis.")
  return matmul(x, axis, output_axes, has_bias)


def einsum(name, module, x, equation: str, has_bias: bool) -> layers.LayerView:
  """``<rows><contract>,<contract><out>-><rows><out>`` up to the order within each group."""
  equation = equation.replace(" ", "")
  lhs, rhs, out = *equation.split("->")[0].split(","), equation.split("->")[1]
  contract = [c for c in rhs if c in lhs and c not in out]
  features = [c for c in rhs if c in out and c not in lhs]
  rows = [c for c in lhs if c in out and c not in rhs]
  ok = ("." not in equation and rhs == "".join(contract + features) and features
        and contract and len(set(lhs)) == len(lhs) == len(rows) + len(contract)
        and len(out) == len(rows) + len(features)
        and [c for c in out if c in features] == features
        and (not rows or lhs[0] == rows[0] == out[0]))
  if not ok:
    fail(name, module, f"the equation {equation!r}",
         "Supported: '<rows><contract>,<contract><out>-><rows><out>' (letters in any order "
         "within a group, output features in kernel order, the batch letter first in input "
         "and output, no ellipsis).")
  view = matmul(x, tuple(lhs.index(c) for c in contract), len(features), has_bias)
  perm = tuple(out.index(c) for c in rows + features)
  return view._replace(output_perm=None if perm == tuple(range(len(out))) else perm)


def conv(name, module, *, kernel_size, strides, padding, input_dilation, kernel_dilation,
         feature_group_count, mask, has_bias) -> layers.LayerView:
  """An N-D convolution (im2col rows); grouped or masked ones raise."""
  if feature_group_count != 1:
    fail(name, module, f"feature_group_count={feature_group_count} (grouped convolution)",
         "Use feature_group_count=1.")
  if mask is not None:
    fail(name, module, "a kernel mask", "Remove the mask.")
  kernel_size = as_tuple(kernel_size)
  rank = len(kernel_size)
  spec = layers.ConvSpec(kernel_size, _spatial(strides, rank),
                         canonicalize_padding(padding, rank), _spatial(input_dilation, rank),
                         _spatial(kernel_dilation, rank))
  return layers.LayerView(None, 0, None, 1, spec, has_bias)


def flax_conv(name, module, has_bias: bool) -> layers.LayerView:
  """:func:`conv` for a Flax convolution (Linen ``nn.Conv`` and NNX ``nnx.Conv`` share the
  attribute names)."""
  return conv(name, module, kernel_size=module.kernel_size, strides=module.strides,
              padding=module.padding, input_dilation=module.input_dilation,
              kernel_dilation=module.kernel_dilation,
              feature_group_count=module.feature_group_count, mask=module.mask,
              has_bias=has_bias)


def excluder(exclude) -> Callable[[str, object], bool]:
  """``exclude=`` as a predicate ``(path, module) -> bool``: None, fnmatch patterns, or one."""
  if exclude is None:
    return lambda name, module: False
  if callable(exclude):
    return exclude
  patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)
