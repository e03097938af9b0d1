"""Per-layer curvature capture: a framework-neutral core and front ends (Linen).

Public entry points: :mod:`eva_optax.flax` (Linen) and :func:`eva_optax.coverage_report`.
"""
