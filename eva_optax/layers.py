"""Layer kinds as matrix multiplies: the 2-D matrix view of a kernel and of a layer's input.

Framework-neutral (no Flax import): the capture front ends describe each layer call with a
:class:`LayerView`, the optimizers view each kernel through a :class:`Layout`.

Every supported layer is a matrix multiply in disguise, ``y = a K + b`` (DESIGN §4, Flax
layout). A kernel is ``[*stack, *inputs, *outputs]``:

* ``stack``: the leading axes of a layer stack (``nn.scan`` over layers, ``nn.vmap``
  ensembles) — one independent matrix, and one set of statistics, per slice;
* ``inputs``: flattened into d_in (Dense: the input features; DenseGeneral/Einsum: the
  contracting axes in kernel order; Conv: ``[*kernel_size, c_in]``, the im2col patch);
* ``outputs``: flattened into d_out (Dense/Conv: the last axis; DenseGeneral: ``features``,
  e.g. attention's ``[heads, head_dim]``).

With a bias ``[*stack, *outputs]`` the gradient matrix gets the bias gradient as an extra last
row, ``Ĝ = [∇K; ∇b] ∈ ℝ^{(d_in+1)×d_out}`` per slice, and the activation statistics a 1.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

LayerName = str  # module path joined with "/", e.g. "Encoder_0/Dense_1"


def layer_name(path: tuple[str, ...]) -> LayerName:
  return "/".join(path)


class Layout(NamedTuple):
  """How a layer's parameters form slices of a ``[d_in, d_out]`` matrix.

  Attributes:
    stacked_axes: number of leading stack axes of the kernel (0 for a plain layer; 1 for
      ``nn.scan`` over layers or an ``nn.vmap`` ensemble with ``variable_axes={"params": 0}``).
    output_axes: number of trailing kernel axes flattened into d_out (1 for Dense and Conv; 2
      for an attention q/k/v projection ``[d, heads, head_dim]``).
    kernel: the key of the layer's ``[*stack, *inputs, *outputs]`` matrix in its parameter
      dict (Flax: ``"kernel"``; e.g. ``"w"`` for a hand-written JAX model).
    bias: the key of its ``[*stack, *outputs]`` bias (``"bias"``; absent keys mean no bias).
  """

  stacked_axes: int = 0
  output_axes: int = 1
  kernel: str = "kernel"
  bias: str = "bias"


def check_layout(name: LayerName, layer: Mapping[str, jax.Array], layout: Layout) -> None:
  """Raises ``ValueError`` when ``layer``'s kernel (and bias) cannot have ``layout``."""
  shape = jnp.shape(layer["kernel"])
  stack = shape[:layout.stacked_axes]
  outputs = shape[len(shape) - layout.output_axes:]
  if (layout.stacked_axes < 0 or layout.output_axes < 1
      or len(shape) < layout.stacked_axes + layout.output_axes + 1):
    raise ValueError(f"eva_optax: layer '{name}' has a kernel of shape {shape}, which cannot "
                     f"have {layout} (it needs ≥ 1 input axis between stack and outputs).")
  if "bias" in layer and jnp.shape(layer["bias"]) != stack + outputs:
    raise ValueError(
        f"eva_optax: layer '{name}': with {layout} the bias of kernel {shape} should have "
        f"shape {stack + outputs}, got {jnp.shape(layer['bias'])}. Pass the layouts the "
        "capture reports (layouts=capture.describe(params, *batch).layouts).")


def stack_shape(layer: Mapping[str, jax.Array], layout: Layout) -> tuple[int, ...]:
  return tuple(jnp.shape(layer["kernel"])[:layout.stacked_axes])


def matrix_shape(layer: Mapping[str, jax.Array], layout: Layout = Layout()) -> tuple[int, int]:
  """``(d_in [+1 with bias], d_out)`` of one slice of a layer's gradient matrix Ĝ."""
  shape = jnp.shape(layer["kernel"])[layout.stacked_axes:]
  split = len(shape) - layout.output_axes
  return math.prod(shape[:split]) + ("bias" in layer), math.prod(shape[split:])


def to_matrix(layer: Mapping[str, jax.Array], layout: Layout = Layout()) -> jax.Array:
  """Ĝ = [∇K; ∇b] as float32 ``[*stack, d_in (+1), d_out]``.

  On an explicitly sharded kernel (``jax.sharding.AxisType.Explicit`` mesh) the matrix keeps
  the stack axes' and the (major) output axis' sharding and has its rows unsharded
  (:func:`matrix_spec`): column (tensor-parallel) sharding costs nothing, a kernel sharded
  along an input axis is gathered along it.
  """
  stack = stack_shape(layer, layout)
  d, d_out = matrix_shape(layer, layout)
  d_in = d - ("bias" in layer)
  entries = matrix_spec(layer["kernel"], layout)
  matrix = _reshape(layer["kernel"], stack + (d_in, d_out), entries).astype(jnp.float32)
  if "bias" in layer:
    bias = _reshape(layer["bias"], stack + (1, d_out), entries).astype(jnp.float32)
    matrix = jnp.concatenate([matrix, bias], axis=-2)
  return matrix


def from_matrix(matrix: jax.Array, like: Mapping[str, jax.Array],
                layout: Layout = Layout()) -> dict[str, jax.Array]:
  """Inverse of :func:`to_matrix`, casting back to each leaf's dtype (and, on an explicit
  mesh, resharding to each leaf's sharding)."""
  kernel = like["kernel"]
  d_in = matrix.shape[-2] - ("bias" in like)
  out = {"kernel": _reshape(matrix[..., :d_in, :], kernel.shape, spec(kernel)
                            ).astype(kernel.dtype)}
  if "bias" in like:
    bias = like["bias"]
    out["bias"] = _reshape(matrix[..., d_in, :], bias.shape, spec(bias)).astype(bias.dtype)
  return out


# --- explicit sharding ------------------------------------------------------------------------


def explicit_mesh(x) -> Optional[jax.sharding.AbstractMesh]:
  """The mesh in ``x``'s type when it has an Explicit axis (``jax.sharding.AxisType``), else
  None: only then are shardings part of the types, so that reshapes, contractions over sharded
  axes and ``where`` between differently sharded arrays must be spelled out."""
  mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  if mesh is None or jax.sharding.AxisType.Explicit not in getattr(mesh, "axis_types", ()):
    return None
  return mesh


def spec(x) -> tuple:
  """The ``PartitionSpec`` entries of ``x`` padded to its rank (all None without an explicit
  mesh)."""
  entries = tuple(jax.typeof(x).sharding.spec) if explicit_mesh(x) is not None else ()
  return entries + (None,) * (jnp.ndim(x) - len(entries))


def sharded_as(x: jax.Array, entries: tuple, mesh=None) -> jax.Array:
  """``x`` resharded to ``PartitionSpec(*entries)`` on its explicit mesh (or ``mesh``, e.g. a
  kernel's for a freshly made array); ``x`` itself otherwise (plain jit, pmap, shard_map
  bodies)."""
  mesh = mesh if mesh is not None else explicit_mesh(x)
  if mesh is None or spec(x) == tuple(entries):
    return x
  return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      *entries)))


def sharded_like(x: jax.Array, reference: jax.Array) -> jax.Array:
  """``x`` with ``reference``'s sharding (same rank) on an explicit mesh; ``x`` otherwise."""
  return sharded_as(x, spec(reference)) if explicit_mesh(reference) is not None else x


def matrix_spec(kernel: jax.Array, layout: Layout = Layout()) -> tuple:
  """The sharding of :func:`to_matrix`'s ``[*stack, rows, d_out]``: the kernel's stack axes,
  unsharded rows and, for d_out, the first output axis' mesh axis when the other output axes
  are unsharded (merging keeps contiguous shards), else unsharded."""
  entries = spec(kernel)
  outputs = entries[len(entries) - layout.output_axes:]
  column = outputs[0] if all(e is None for e in outputs[1:]) else None
  return entries[:layout.stacked_axes] + (None, column)


def _reshape(x: jax.Array, shape: tuple, entries: tuple) -> jax.Array:
  """``x.reshape(shape)``, on an explicit mesh with the output sharding ``entries`` (JAX cannot
  infer it when a sharded axis is merged or split)."""
  mesh = explicit_mesh(x)
  if mesh is None:
    return x.reshape(shape)
  return jax.lax.reshape(x, tuple(shape), out_sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*entries)))


def over_stack(fn: Callable, stacked_axes: int, in_axes=0) -> Callable:
  """``fn`` mapped over ``stacked_axes`` leading axes (nested ``jax.vmap``; ``fn`` itself for
  0): one slice of a layer stack at a time, without a Python loop over slices."""
  for _ in range(stacked_axes):
    fn = jax.vmap(fn, in_axes=in_axes)
  return fn


# --- the input side ---------------------------------------------------------------------------


class ConvSpec(NamedTuple):
  """The geometry of an N-D convolution (Flax conventions, ``padding`` canonicalized: a string
  or a sequence of ``(low, high)`` pairs)."""

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: object
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]


class LayerView(NamedTuple):
  """How one layer call's input ``x`` and output ``y`` map to the rows of its matrix multiply.

  Attributes:
    input_perm: transpose of ``x`` that puts the contracting axes last, in kernel order
      (``None``: already so); ignored for a conv.
    input_axes: number of trailing (permuted) axes of ``x`` flattened into d_in; ignored for a
      conv.
    output_perm: transpose of ``y`` that puts the output axes last, in kernel order (``None``:
      already so).
    output_axes: number of trailing (permuted) axes of ``y`` flattened into d_out.
    conv: the convolution's geometry (rows are im2col patches), ``None`` for a matmul.
    has_bias: whether the layer adds a bias (A gets the constant-1 input).
  """

  input_perm: Optional[tuple[int, ...]]
  input_axes: int
  output_perm: Optional[tuple[int, ...]]
  output_axes: int
  conv: Optional[ConvSpec]
  has_bias: bool

  def batch_size(self, x: jax.Array) -> int:
    """The size of ``x``'s leading (batch) axis, 1 when ``x`` has no axis besides the features."""
    features = len(self.conv.kernel_size) + 1 if self.conv else self.input_axes
    return x.shape[0] if x.ndim > features else 1

  def input_rows(self, x: jax.Array) -> jax.Array:
    """The float32 rows ``[rows, d_in]`` (examples major)."""
    if self.conv is not None:
      return patches(self.conv, _images(self.conv, x))
    if self.input_perm is not None:
      x = jnp.transpose(x, self.input_perm)
    return x.astype(jnp.float32).reshape(-1, math.prod(x.shape[x.ndim - self.input_axes:]))

  def output_rows(self, y: jax.Array) -> jax.Array:
    """The float32 rows ``[rows, d_out]`` of an output-shaped array (the output or its
    cotangent), rows ordered like :meth:`input_rows`."""
    if self.output_perm is not None:
      y = jnp.transpose(y, self.output_perm)
    return y.astype(jnp.float32).reshape(-1, math.prod(y.shape[y.ndim - self.output_axes:]))

  def mean_input(self, x: jax.Array) -> jax.Array:
    """ā: the input averaged over every row, float32 ``(d_in,)``.

    For a conv, im2col is linear, so the batch mean is taken first (one image instead of B)
    and the patch extraction runs once: O(H·W·c_in·prod(kernel_size)), far below the conv.
    """
    if self.conv is not None:
      mean_image = jnp.mean(_images(self.conv, x), axis=0, keepdims=True)
      return jnp.mean(patches(self.conv, mean_image), axis=0)
    return jnp.mean(self.input_rows(x), axis=0)

  def input_covariance(self, x: jax.Array) -> jax.Array:
    """A = mean over rows of a aᵀ, float32 ``[d_in (+1), d_in (+1)]`` (with a bias the input
    gets a constant 1 appended). Cost O(rows · d_in²), the order of the layer's forward pass."""
    return augmented_gram(self.input_rows(x), self.has_bias)

  def input_factor_product(self, x: jax.Array, vector: jax.Array) -> jax.Array:
    """A v for A = :meth:`input_covariance` (bias-augmented with a bias) and ``vector`` v
    ``(d_in [+1],)``, float32, without forming A: the mean over rows of a (aᵀv), O(rows·d_in).
    For a conv the rows' projections aᵀv are a one-output-channel convolution and Σ a (aᵀv) its
    kernel gradient, so no im2col patches are formed either."""
    weights, shift = (vector[:-1], vector[-1]) if self.has_bias else (vector, 0.0)
    if self.conv is not None:
      projection, kernel_gradient = _conv_projection(self.conv, _images(self.conv, x), weights)
      projection = projection + shift
      product = kernel_gradient(projection)
    else:
      product, projection = gram_product(self.input_rows(x), weights, shift)
    if self.has_bias:
      product = jnp.concatenate([product, jnp.sum(projection)[None]])
    return product / projection.size

  def joint_products(self, x: jax.Array, output_rows: jax.Array, u: jax.Array, v: jax.Array,
                     weights: Callable) -> tuple[jax.Array, jax.Array]:
    """``(Σ_rows a·w_a, Σ_rows g·w_g)``, float32 ``(d_in [+1],)`` and ``(d_out,)``, with a the
    input row (bias-augmented with a bias), g the matching row of ``output_rows``
    ``[rows, d_out]`` and ``(w_a, w_g) = weights(aᵀu, gᵀv)`` per row, in
    O(rows·(d_in + d_out)) without im2col patches for a conv (as :meth:`input_factor_product`).
    ``weights`` (p, r) ↦ (r, p) gives C v, Cᵀ u for C = Σ_rows a gᵀ; (p r², r p²) gives
    (I ⊗ vᵀ) F (u ⊗ v), (uᵀ ⊗ I) F (u ⊗ v) for the rows' Fisher F = Σ_rows vec(a gᵀ) vec(a gᵀ)ᵀ."""
    kernel_weights, shift = (u[:-1], u[-1]) if self.has_bias else (u, 0.0)
    out_projection = jnp.matmul(output_rows, v, precision=jax.lax.Precision.HIGHEST)
    if self.conv is not None:
      projection, kernel_gradient = _conv_projection(self.conv, _images(self.conv, x),
                                                     kernel_weights)
      shape = projection.shape  # [N, *out, 1]: one row per output position, as output_rows
      input_weight, output_weight = weights((projection + shift).reshape(-1), out_projection)
      product = kernel_gradient(input_weight.reshape(shape))
    else:
      rows = self.input_rows(x)
      projection = jnp.matmul(rows, kernel_weights, precision=jax.lax.Precision.HIGHEST) + shift
      input_weight, output_weight = weights(projection, out_projection)
      product = jnp.sum(rows * input_weight[:, None], axis=0)
    if self.has_bias:
      product = jnp.concatenate([product, jnp.sum(input_weight)[None]])
    return product, jnp.sum(output_rows * output_weight[:, None], axis=0)

  def per_example_input(self, x: jax.Array) -> jax.Array:
    """The input averaged over each example's rows (positions), float32 ``[B, d_in]``."""
    rows = self.input_rows(x)
    return jnp.mean(rows.reshape(self.batch_size(x), -1, rows.shape[-1]), axis=1)


def augmented_gram(rows: jax.Array, has_bias: bool) -> jax.Array:
  """mean over rows of [a; 1][a; 1]ᵀ (``has_bias``) or of a aᵀ, float32 ``[d (+1), d (+1)]``."""
  if has_bias:
    # On an explicit mesh feature-sharded rows (the input of a row-parallel layer) are
    # gathered, A being whole on every device anyway, and the column of ones is made with the
    # rows' batch sharding.
    rows = sharded_as(rows, (spec(rows)[0], None))
    ones = sharded_as(jnp.ones((rows.shape[0], 1), rows.dtype), spec(rows), explicit_mesh(rows))
    rows = jnp.concatenate([rows, ones], axis=1)
  return gram(rows) / rows.shape[0]


def gram(rows: jax.Array) -> jax.Array:
  """rowsᵀ rows ``[d, d]`` at HIGHEST precision, replicated when ``rows`` is batch-sharded.

  Under ``jit`` with an explicitly sharded batch the contraction runs over the sharded axis,
  and JAX needs the output sharding spelled out.
  """
  mesh = explicit_mesh(rows)
  out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST, out_sharding=out)


def gram_product(rows: jax.Array, vector: jax.Array, shift=0.0) -> tuple[jax.Array, jax.Array]:
  """``(rowsᵀ p, p)`` with the projections p = rows v + shift ``(rows,)``: a product with the
  Gram of ``[rows, 1]`` in O(rows·d), no d × d matrix (a product and a sum over rows, so the
  rows may be explicitly batch-sharded)."""
  projection = jnp.matmul(rows, vector, precision=jax.lax.Precision.HIGHEST) + shift
  return jnp.sum(rows * projection[:, None], axis=0), projection


def _images(conv: ConvSpec, x: jax.Array) -> jax.Array:
  """The conv input as float32 ``[N, *spatial, c_in]`` (leading batch axes flattened)."""
  rank = len(conv.kernel_size)
  return x.astype(jnp.float32).reshape((-1,) + x.shape[x.ndim - rank - 1:])


def _padded(conv: ConvSpec, images: jax.Array) -> tuple[jax.Array, object]:
  """``(images, padding)`` for ``lax``: Flax's CIRCULAR, REFLECT and CAUSAL modes pad the input
  explicitly and then run a VALID convolution; the others pass through."""
  padding = conv.padding
  if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
    dilated = [(k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.kernel_dilation)]
    if padding == "CAUSAL":
      pads, mode = [(dilated[0] - 1, 0)], "constant"
    else:
      pads = [((k - 1) // 2, k // 2) for k in dilated]
      mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    images = jnp.pad(images, [(0, 0)] + pads + [(0, 0)], mode=mode)
    padding = "VALID"
  return images, padding


def _conv_projection(conv: ConvSpec, images: jax.Array, weights: jax.Array):
  """``(p, kernel_gradient)``: p ``[N, *out, 1]`` the convolution of float32 ``images`` with
  the one-output-channel kernel ``weights`` ``(d_in,)`` (kernel-row order), i.e. every im2col
  row's aᵀw, and ``kernel_gradient(c) = Σ_rows c_row · a_row`` ``(d_in,)`` (its VJP)."""
  rank = len(conv.kernel_size)
  images, padding = _padded(conv, images)
  spatial = tuple(range(1, rank + 1))
  numbers = jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, rank + 1) + spatial, rhs_spec=(rank + 1, rank) + tuple(range(rank)),
      out_spec=(0, rank + 1) + spatial)
  kernel = weights.reshape(conv.kernel_size + (images.shape[-1], 1))
  projection, vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(
      images, k, conv.strides, padding, lhs_dilation=conv.input_dilation,
      rhs_dilation=conv.kernel_dilation, dimension_numbers=numbers,
      precision=jax.lax.Precision.HIGHEST), kernel)
  return projection, lambda cotangent: vjp(cotangent)[0].reshape(-1)


def patches(conv: ConvSpec, images: jax.Array) -> jax.Array:
  """im2col rows ``[N · positions, d_in]`` of float32 ``images [N, *spatial, c_in]``, each row
  ordered like the reshaped HWIO kernel (spatial offsets major, channel minor).

  Zero padding counts as inputs, exactly as in the convolution.
  """
  kernel_size = conv.kernel_size
  rank = len(kernel_size)
  images, padding = _padded(conv, images)
  spatial = tuple(range(1, rank + 1))
  numbers = jax.lax.ConvDimensionNumbers(
      lhs_spec=(0, rank + 1) + spatial, rhs_spec=tuple(range(rank + 2)),
      out_spec=(0, rank + 1) + spatial)
  out = jax.lax.conv_general_dilated_patches(
      images, kernel_size, conv.strides, padding, lhs_dilation=conv.input_dilation,
      rhs_dilation=conv.kernel_dilation, dimension_numbers=numbers,
      precision=jax.lax.Precision.HIGHEST)
  c_in = images.shape[-1]
  # The patch features come out channel-major (c, *kernel); the kernel is (*kernel, c). Split
  # and merge only the feature axis here: a batch-sharded array (jit with a sharded batch)
  # cannot merge and split axes in one reshape.
  features = out.reshape(out.shape[:-1] + (c_in,) + kernel_size)
  features = jnp.moveaxis(features, out.ndim - 1, -1).reshape(out.shape)
  return features.reshape(-1, out.shape[-1])


# --- parameter side -------------------------------------------------------------------------


def key_path_names(path) -> tuple[str, ...]:
  """``(DictKey('a'), DictKey('kernel'))`` → ``("a", "kernel")``; other keys by ``str``."""
  return tuple(str(getattr(k, "key", k)) for k in path)


def dict_path(path) -> Optional[tuple]:
  """The dict keys of ``path``, ignoring a trailing ``.value`` (a Flax NNX ``Variable`` around
  the array, as in ``nnx.state(model, nnx.Param)``); ``None`` for any other kind of path."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  if all(isinstance(k, jax.tree_util.DictKey) for k in path):
    return key_path_names(path)
  return None


def find_layers(tree, layouts: Optional[Mapping[LayerName, Layout]] = None
                ) -> dict[LayerName, dict[str, jax.Array]]:
  """Maps every layer to its ``{"kernel": K, "bias": b}`` leaves (plain arrays, or Flax NNX
  ``Variable``-wrapped ones: their arrays): every parameter dict holding a ``"kernel"`` of rank
  ≥ 2, and every layer of ``layouts`` under its own ``kernel``/``bias`` keys.

  Raises:
    ValueError: a layer of ``layouts`` with custom keys whose kernel is not in ``tree``.
  """
  leaves, masked = _leaves(tree)
  layouts = layouts or {}
  layers = {}
  for path, leaf in leaves.items():
    layout = layouts.get(layer_name(path[:-1]), Layout())
    if path[-1] == layout.kernel == "kernel" and jnp.ndim(leaf) >= 2:
      layers[layer_name(path[:-1])] = _layer(leaves, path[:-1], layout)
  for name, layout in layouts.items():
    if layout.kernel != "kernel":
      path = tuple(name.split("/")) if name else ()
      if path + (layout.kernel,) in masked:
        continue
      if path + (layout.kernel,) not in leaves:
        siblings = sorted(p[-1] for p in leaves if p[:-1] == path)
        raise ValueError(
            f"eva_optax: layouts[{name!r}] names the kernel {layout.kernel!r}, but the params "
            f"have no {'/'.join(path + (layout.kernel,))!r} (keys there: {siblings or 'none'}).")
      layers[name] = _layer(leaves, path, layout)
  return layers


def masked_layers(tree, layouts: Optional[Mapping[LayerName, Layout]] = None) -> set[LayerName]:
  """Layers whose kernel is an ``optax.MaskedNode`` in ``tree``: owned by another inner
  optimizer of ``optax.multi_transform``/``optax.partition``/``optax.masked``."""
  layouts = layouts or {}
  return {layer_name(path[:-1]) for path in _leaves(tree)[1]
          if path[-1] == layouts.get(layer_name(path[:-1]), Layout()).kernel}


def _leaves(tree) -> tuple[dict, set]:
  """``({dict path: array}, {dict paths of optax.MaskedNode leaves})`` of ``tree``."""
  leaves, masked = {}, set()
  masked_node = lambda x: isinstance(x, optax.MaskedNode)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=masked_node)[0]:
    names = dict_path(path)
    if names is not None and masked_node(leaf):
      masked.add(names)  # another partition's (optax.multi_transform, partition, masked)
    elif names is not None:
      leaves[names] = leaf
  return leaves, masked


def _layer(leaves: Mapping, path: tuple, layout: Layout) -> dict[str, jax.Array]:
  layer = {"kernel": leaves[path + (layout.kernel,)]}
  if path + (layout.bias,) in leaves:
    layer["bias"] = leaves[path + (layout.bias,)]
  return layer
