"""Trace-time guards every optimizer of the package runs before its own update.

Misuse should fail at once with a message that names the cause and the fix, rather than train
on silently wrong numbers (issue 15). :func:`guarded` wraps a transformation so that

* integer or boolean parameters/gradients raise a ``TypeError`` (a second-order direction of an
  integer tensor is truncated to zero or to a few integers when cast back);
* a state that is not shaped like ``tx.init(params)`` raises a ``ValueError`` that blames the
  stale state (another model's, or an older ``init``'s) instead of the curvature or a raw
  broadcasting error deep inside the update;
* a state whose optimizer records came back as plain dicts (an orbax checkpoint restored
  without a target) raises a ``TypeError`` that names the template route.

All checks look at shapes, dtypes and pytree structure only, so under ``jit`` they cost nothing
after tracing.

Huge gradients
--------------
A finite gradient of absurd scale (every entry 1e30, say) passes ``optax.apply_if_finite``, and
an optimizer whose step is proportional to the gradient (Eva-s grafts to ‖G‖; K-BFGS's
H^a Ĝ H^g is linear in Ĝ) takes a step of that scale. :func:`skipping_scale_jumps` keeps a
running scale of the gradient and skips a step whose gradient jumps above
:data:`~eva_optax.collectors.MAX_SCALE_JUMP` times it, the policy of the curvature records;
:func:`skipping_whole_chain` extends the skip to the momentum around such a transformation.

Checkpoints
-----------
Save the state with orbax like any pytree and restore it with its structure as the target::

    checkpointer = orbax.checkpoint.StandardCheckpointer()
    checkpointer.save(path, {"params": params, "opt_state": opt_state})
    restored = checkpointer.restore(path, {"params": jax.eval_shape(lambda: params),
                                           "opt_state": jax.eval_shape(tx.init, params)})

Training resumed this way equals the uninterrupted run bit for bit, also when the checkpoint
falls between two inverse/root refreshes (tests/test_reliability.py, in a fresh process).
Without a target orbax returns plain dicts and lists: ``update`` then raises the ``TypeError``
above. Rebuilding a state from such a restore's leaves
(``jax.tree.unflatten(jax.tree.structure(tx.init(params)), jax.tree.leaves(raw))``) is not
supported: it is correct for this package's own state records, whose fields are listed
alphabetically (the order of a dict's leaves), but optax's records (e.g.
``optax.apply_if_finite``'s or ``optax.MultiSteps``') are not ordered so, and their fields would
be silently swapped.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from eva_optax import collectors

RESTORE_FIX = ("restore the checkpoint with the state's structure as target: "
               "checkpointer.restore(path, jax.eval_shape(tx.init, params))")
REINIT_FIX = ("re-run opt_state = tx.init(params) for these parameters (or " + RESTORE_FIX +
              ")")


class TracedStructure(ValueError):
  """Raised by an ``init`` whose state shapes depend on a hyperparameter that is traced here
  (``optax.inject_hyperparams`` traces numeric arguments in ``update``): the guard cannot rebuild
  the expected state then, and skips the state check (the dtype checks still run)."""


def _is_record(node) -> bool:
  """Whether ``node`` is a NamedTuple (an optimizer state or statistics record)."""
  return isinstance(node, tuple) and hasattr(node, "_fields")


def check_floating(tree, what: str, who: str) -> None:
  """Raises ``TypeError`` when an array leaf of ``tree`` has an integer or boolean dtype.

  ``float0`` leaves (``jax.grad(..., allow_int=True)``'s gradients of integer inputs) and
  non-array leaves are skipped: they are not trained.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or dtype == jax.dtypes.float0:
      continue
    if jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
      raise TypeError(
          f"eva_optax: {who} got {what} of dtype {dtype} at "
          f"{jax.tree_util.keystr(path) or '(root)'}: a preconditioned step cast back to an "
          "integer dtype is truncated (often to all zeros). Train floating-point parameters: "
          "cast them first, e.g. params = jax.tree.map(lambda p: p.astype(jnp.float32), "
          "params), then call tx.init(params).")


def _sequence(node):
  """``node``'s children as a list when it is a sequence (tuple, list, or the int-keyed mapping
  ``nnx.Optimizer`` makes of a tuple), else None."""
  if isinstance(node, (tuple, list)):
    return list(node)
  if isinstance(node, Mapping) and set(node) == set(range(len(node))):
    return [node[i] for i in range(len(node))]
  return None


def _stale(who: str, where: str, detail: str) -> ValueError:
  return ValueError(
      f"eva_optax: {who}'s optimizer state does not fit these parameters: {where} {detail}. "
      f"The state is stale (from another model's or an older tx.init): {REINIT_FIX}.")


def _compare(expected, actual, where: str, who: str) -> None:
  """Walks ``expected`` (``jax.eval_shape(tx.init, params)``) and ``actual`` together."""
  if _is_record(expected):
    if type(actual) is not type(expected):
      raise TypeError(
          f"eva_optax: {who}'s optimizer state {where} is a {type(actual).__name__}, not a "
          f"{type(expected).__name__}: a checkpoint restored without a target gives plain "
          f"dicts and lists, and rebuilding the state from their leaves would mix up its "
          f"fields. {RESTORE_FIX[0].upper() + RESTORE_FIX[1:]}.")
    for field in expected._fields:
      _compare(getattr(expected, field), getattr(actual, field), f"{where}.{field}", who)
  elif isinstance(expected, (tuple, list)):
    items = _sequence(actual)
    if items is None or len(items) != len(expected):
      raise _stale(who, where, f"holds {_describe(actual)}, tx.init(params) gives "
                               f"{len(expected)} entries")
    for i, (e, a) in enumerate(zip(expected, items)):
      _compare(e, a, f"{where}[{i}]", who)
  elif isinstance(expected, Mapping):
    if not isinstance(actual, Mapping) or set(actual) != set(expected):
      keys = sorted(map(str, actual)) if isinstance(actual, Mapping) else _describe(actual)
      raise _stale(who, where, f"has keys {keys}, tx.init(params) gives "
                               f"{sorted(map(str, expected))}")
    for key in expected:
      _compare(expected[key], actual[key], f"{where}[{key!r}]", who)
  elif isinstance(expected, jax.ShapeDtypeStruct):
    if not hasattr(actual, "shape") or tuple(actual.shape) != tuple(expected.shape):
      raise _stale(who, where, f"has shape {getattr(actual, 'shape', _describe(actual))}, "
                               f"tx.init(params) gives {tuple(expected.shape)}")


def _describe(node) -> str:
  if isinstance(node, (tuple, list, Mapping)):
    return f"a {type(node).__name__} of {len(node)} entries"
  return f"a {type(node).__name__}"


def check_state(state, init, updates, who: str) -> None:
  """Raises when ``state`` is not shaped like ``init(updates)`` (see the module docstring);
  does nothing when ``init`` raises :class:`TracedStructure` (shapes set by a traced
  hyperparameter, e.g. K-BFGS(L)'s ``memory_size`` under ``inject_hyperparams``).

  Raises:
    TypeError: an optimizer record restored as a plain dict/list (no checkpoint target).
    ValueError: missing or extra layers/tensors, or an array of another shape (stale state).
  """
  try:
    expected = jax.eval_shape(init, updates)
  except TracedStructure:
    return
  _compare(expected, state, "state", who)


def guarded(tx: optax.GradientTransformation, who: str) -> optax.GradientTransformationExtraArgs:
  """``tx`` with the guards of this module: ``init`` checks the parameters' dtypes, ``update``
  the gradients' and parameters' dtypes and the state against ``tx.init`` (trace time only).

  Raises:
    TypeError: integer/boolean parameters or gradients; a state restored without a target.
    ValueError: a stale state (from another model's or an older ``tx.init``).
  """
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    check_floating(params, "parameters", who)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    check_floating(updates, "gradients", who)
    if params is not None:
      check_floating(params, "parameters", who)
    check_state(state, tx.init, updates, who)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The running scale of the gradient (a state record's float32 ``grad_scale``) is an average of
# each accepted step's largest |entry| weighting the new value by GRADIENT_SCALE_WEIGHT, from
# the first step's value (collectors.running_average). At 0.1 the scale stays within a few
# steps of the gradient: one that grows 10× per step is ~100× above it (far below
# MAX_SCALE_JUMP, so never skipped), and one accepted spike is forgotten after a few tens of
# steps (0.9^k), where a slower average would keep the guard loose for hundreds.
GRADIENT_SCALE_WEIGHT = 0.1
# A skipped step raises the scale by this factor: a lasting change of the gradient's scale by
# J > MAX_SCALE_JUMP (a model that really changed regime) is accepted after log10(J / 1e6)
# skipped steps instead of never, while one bad step loosens the guard only 10× for a while.
SKIPPED_SCALE_GROWTH = 10.0


def largest_entry(tree) -> jax.Array:
  """float32 scalar: the largest |entry| of the array leaves of ``tree`` (0 without entries)."""
  tops = (jnp.max(jnp.abs(x), initial=0).astype(jnp.float32) for x in jax.tree.leaves(tree))
  return functools.reduce(jnp.maximum, tops, jnp.zeros((), jnp.float32))


def _structured_like(new_state, old_state):
  """``old_state``'s leaves in ``new_state``'s structure: ``nnx.Optimizer`` hands the state
  back with every tuple turned into an int-keyed mapping (same leaves, same order), while
  ``update`` returns tuples."""
  return jax.tree.unflatten(jax.tree.structure(new_state), jax.tree.leaves(old_state))


def skipping_scale_jumps(update_fn):
  """``update_fn`` (of a transformation whose state record has ``count`` and ``grad_scale``)
  that skips a step whose finite gradient jumped in scale: when the largest |entry| of
  ``updates`` exceeds :data:`~eva_optax.collectors.MAX_SCALE_JUMP` times the running scale
  (see :data:`GRADIENT_SCALE_WEIGHT`; a scale of 0, before any nonzero gradient, accepts any),
  the updates are zero and the state is the old one, ``count`` included (which
  :func:`skipping_whole_chain` reads), but for ``grad_scale`` ×:data:`SKIPPED_SCALE_GROWTH`.
  A non-finite gradient is left to the transformation and ``optax.apply_if_finite``."""
  def update(updates, state, params=None, **extra_args):
    new_updates, new_state = update_fn(updates, state, params, **extra_args)
    top = largest_entry(updates)
    skip = jnp.isfinite(top) & collectors.scale_jumped(state.grad_scale, top,
                                                       collectors.MAX_SCALE_JUMP)
    scale = jnp.where(skip, SKIPPED_SCALE_GROWTH * state.grad_scale,
                      collectors.running_average(state.grad_scale, top, state.count,
                                                 GRADIENT_SCALE_WEIGHT))
    new_updates, new_state = collectors.keep_unless(
        skip, (new_updates, new_state),
        (jax.tree.map(jnp.zeros_like, updates), _structured_like(new_state, state)))
    return new_updates, new_state._replace(grad_scale=scale)

  return update


def skipping_whole_chain(chain: optax.GradientTransformationExtraArgs, index: int
                         ) -> optax.GradientTransformationExtraArgs:
  """``chain`` (an ``optax.chain``) whose every element keeps its state, and whose updates are
  zero, when element ``index`` (updated by :func:`skipping_scale_jumps`) skipped the step, as
  ``optax.apply_if_finite`` skips a whole non-finite step: momentum before that element
  (K-BFGS's ``optax.ema``) would otherwise take the huge gradient in and carry it for hundreds
  of steps, momentum after it (Eva-s' ``optax.trace``) would still move the parameters."""
  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = chain.update(updates, state, params, **extra_args)
    # A step skipped by skipping_scale_jumps does not count; once the count saturates (after
    # 2³¹ steps) this reads every step as taken, and only the element itself skips.
    skipped = new_state[index].count != optax.safe_increment(state[index].count)
    kept = tuple(new_state[i] if i == index else old for i, old in enumerate(state))
    return collectors.keep_unless(skipped, (new_updates, new_state),
                                  (jax.tree.map(jnp.zeros_like, new_updates),
                                   _structured_like(new_state, kept)))

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
