"""Benchmarks of eva_optax against first-order Optax optimizers (``python -m benchmarks.run``)."""
