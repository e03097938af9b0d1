"""Layer kinds: how a Flax layer's parameters and inputs map to the 2-D matrix view.

Every supported layer is a matrix multiply in disguise, ``y = a K + b``, with ``K`` viewed as a
``[d_in, d_out]`` matrix (DESIGN §4, Flax layout):

* ``nn.Dense`` / single-axis ``nn.DenseGeneral``: the kernel as it is, ``a`` the layer input.
* ``nn.Conv`` (any number of spatial dims): the ``[*kernel_size, c_in, c_out]`` (HWIO) kernel
  reshaped to ``[prod(kernel_size) * c_in, c_out]``, ``a`` an im2col patch ordered the same way
  (spatial offsets major, channel minor).

With a bias the gradient matrix gets the bias gradient as an extra last row,
``Ĝ = [∇K; ∇b] ∈ ℝ^{(d_in+1)×d_out}``, and the activation statistics get a 1 appended.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

LayerName = str  # module path joined with "/", e.g. "Encoder_0/Dense_1"


class LayerInfo(NamedTuple):
  """Static description of one captured layer call (shapes only, no arrays).

  Attributes:
    name: module path joined with ``/``.
    batch_size: size of the layer input's leading (batch) axis, 1 for unbatched input.
    rows: number of rows the statistics average over (batch × sequence × output positions).
    output_shape: shape of the layer output.
  """

  name: LayerName
  batch_size: int
  rows: int
  output_shape: tuple[int, ...]


def layer_name(path: tuple[str, ...]) -> LayerName:
  return "/".join(path)


def is_supported(module: nn.Module) -> bool:
  return isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Conv))


def check_supported(module: nn.Module, name: LayerName) -> None:
  """Raises ``NotImplementedError`` naming the layer for configurations we cannot precondition."""
  def fail(what: str, fix: str) -> None:
    raise NotImplementedError(
        f"eva_optax: layer '{name}' ({type(module).__name__}) uses {what}, which the Kronecker "
        f"statistics do not support. {fix}")

  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
    if not (axis == -1 or axis == (-1,)):
      fail(f"contracting axes {module.axis}", "Use a single contracting axis=-1 or nn.Dense.")
    if module.batch_dims:
      fail(f"batch_dims={module.batch_dims}", "Use batch_dims=().")
    if not isinstance(module.features, int) and len(module.features) != 1:
      fail(f"several output features {module.features}",
           "Reshape the output after an nn.Dense instead.")
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1:
      fail(f"feature_group_count={module.feature_group_count} (grouped convolution)",
           "Use feature_group_count=1.")
    if module.mask is not None:
      fail("a kernel mask", "Remove the mask.")


def _spatial_tuple(value, rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


def _kernel_size(conv: nn.Conv) -> tuple[int, ...]:
  return (conv.kernel_size,) if isinstance(conv.kernel_size, int) else tuple(conv.kernel_size)


def _patches(conv: nn.Conv, images: jax.Array) -> jax.Array:
  """im2col rows ``[N · positions, d_in]`` of float32 ``images [N, *spatial, c_in]``, each row
  ordered like the reshaped HWIO kernel (spatial offsets major, channel minor).

  Zero padding counts as inputs, exactly as in the convolution.
  """
  kernel_size = _kernel_size(conv)
  rank = len(kernel_size)
  kernel_dilation = _spatial_tuple(conv.kernel_dilation, rank)
  padding = canonicalize_padding(conv.padding, rank)
  if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
    # Mirror Flax: these modes pad the input explicitly and then run a VALID convolution.
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    if padding == "CAUSAL":
      pads, mode = [(dilated[0] - 1, 0)], "constant"
    else:
      pads = [((k - 1) // 2, k // 2) for k in dilated]
      mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    images = jnp.pad(images, [(0, 0)] + pads + [(0, 0)], mode=mode)
    padding = "VALID"
  spatial = tuple(range(1, rank + 1))
  numbers = jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, rank + 1) + spatial, rhs_spec=tuple(range(rank + 2)),
      out_spec=(0, rank + 1) + spatial)
  patches = jax.lax.conv_general_dilated_patches(
      images, kernel_size, _spatial_tuple(conv.strides, rank), padding,
      lhs_dilation=_spatial_tuple(conv.input_dilation, rank), rhs_dilation=kernel_dilation,
      dimension_numbers=numbers, precision=jax.lax.Precision.HIGHEST)
  c_in = images.shape[-1]
  # The patch features come out channel-major (c, *kernel); the kernel is (*kernel, c). Split
  # and merge only the feature axis here: a batch-sharded array (jit with a sharded batch)
  # cannot merge and split axes in one reshape.
  features = patches.reshape(patches.shape[:-1] + (c_in,) + kernel_size)
  features = jnp.moveaxis(features, patches.ndim - 1, -1).reshape(patches.shape)
  return features.reshape(-1, patches.shape[-1])


def _images(conv: nn.Conv, x: jax.Array) -> jax.Array:
  """The conv input as float32 ``[N, *spatial, c_in]`` (leading batch axes flattened)."""
  rank = len(_kernel_size(conv))
  return x.astype(jnp.float32).reshape((-1,) + x.shape[x.ndim - rank - 1:])


def _rows(module: nn.Module, x: jax.Array) -> jax.Array:
  """The layer input as the float32 rows ``[rows, d_in]`` of its matrix multiply."""
  if isinstance(module, nn.Conv):
    return _patches(module, _images(module, x))
  return x.astype(jnp.float32).reshape(-1, x.shape[-1])


def mean_input(module: nn.Module, x: jax.Array) -> jax.Array:
  """ā: the layer input averaged over every row of the matrix multiply, float32 ``(d_in,)``.

  For a conv, im2col is linear, so the batch mean is taken first (one image instead of B) and
  the patch extraction runs once: O(H·W·c_in·prod(kernel_size)), far below the convolution.
  """
  if isinstance(module, nn.Conv):
    mean_image = jnp.mean(_images(module, x), axis=0, keepdims=True)
    return jnp.mean(_patches(module, mean_image), axis=0)
  return jnp.mean(_rows(module, x), axis=0)


def input_covariance(module: nn.Module, x: jax.Array) -> jax.Array:
  """A = mean over rows of a aᵀ, float32 ``[d_in (+1), d_in (+1)]``.

  Rows are every (example, sequence position, conv output position) of the matrix multiply
  (KFC for conv: the im2col patches of the whole batch). With a bias the input gets a constant
  1 appended, so A's last row and column are ā and 1 (the bias row of Ĝ). Cost O(rows · d_in²),
  the order of the layer's own forward pass.
  """
  rows = _rows(module, x)
  if module.use_bias:
    rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
  return gram(rows) / rows.shape[0]


def gram(rows: jax.Array) -> jax.Array:
  """rowsᵀ rows ``[d, d]`` at HIGHEST precision, replicated when ``rows`` is batch-sharded.

  Under ``jit`` with an explicitly sharded batch the contraction runs over the sharded axis,
  and JAX needs the output sharding spelled out.
  """
  mesh = getattr(jax.typeof(rows).sharding, "mesh", None)
  explicit = mesh is not None and jax.sharding.AxisType.Explicit in mesh.axis_types
  out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if explicit else None
  return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST, out_sharding=out)


def describe(module: nn.Module, name: LayerName, x: jax.Array, y: jax.Array) -> LayerInfo:
  if isinstance(module, nn.Conv):
    batched = x.ndim > len(_kernel_size(module)) + 1
  else:
    batched = x.ndim > 1
  batch_size = x.shape[0] if batched else 1
  return LayerInfo(name, batch_size, math.prod(y.shape[:-1]), tuple(y.shape))


# --- parameter side -------------------------------------------------------------------------


def key_path_names(path) -> tuple[str, ...]:
  """``(DictKey('a'), DictKey('kernel'))`` → ``("a", "kernel")``; other keys by ``str``."""
  return tuple(str(getattr(k, "key", k)) for k in path)


def find_layers(tree) -> dict[LayerName, dict[str, jax.Array]]:
  """Maps every parameter dict holding a ``kernel`` of rank ≥ 2 to its ``kernel``/``bias`` leaves."""
  leaves = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if all(isinstance(k, jax.tree_util.DictKey) for k in path):
      leaves[key_path_names(path)] = leaf
  layers = {}
  for path, leaf in leaves.items():
    if path[-1] == "kernel" and jnp.ndim(leaf) >= 2:
      layer = {"kernel": leaf}
      if path[:-1] + ("bias",) in leaves:
        layer["bias"] = leaves[path[:-1] + ("bias",)]
      layers[layer_name(path[:-1])] = layer
  return layers


def matrix_shape(layer: Mapping[str, jax.Array]) -> tuple[int, int]:
  """``(d_in [+1 with bias], d_out)`` of a layer's gradient matrix Ĝ."""
  shape = jnp.shape(layer["kernel"])
  return math.prod(shape[:-1]) + ("bias" in layer), shape[-1]


def to_matrix(layer: Mapping[str, jax.Array]) -> jax.Array:
  """Ĝ = [∇K reshaped; ∇b] as float32 ``[d_in (+1), d_out]``."""
  kernel = layer["kernel"]
  matrix = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
  if "bias" in layer:
    matrix = jnp.concatenate([matrix, layer["bias"].reshape(1, -1).astype(jnp.float32)])
  return matrix


def from_matrix(matrix: jax.Array, like: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Inverse of :func:`to_matrix`, casting back to each leaf's dtype."""
  kernel = like["kernel"]
  d_in = math.prod(kernel.shape[:-1])
  out = {"kernel": matrix[:d_in].reshape(kernel.shape).astype(kernel.dtype)}
  if "bias" in like:
    out["bias"] = matrix[d_in].reshape(like["bias"].shape).astype(like["bias"].dtype)
  return out
