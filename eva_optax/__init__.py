"""eva_optax: practical second-order optimizers for JAX as Optax gradient transformations."""

from eva_optax import flax
from eva_optax.collectors import Collector, KroneckerVectors, running_average
from eva_optax.eva import eva, eva_diagnostics, eva_layer, scale_by_eva
from eva_optax.transform import (Preconditioner, ScaleByKroneckerState, kl_clip, kl_normalize,
                                 no_scaling, scale_by_kronecker)

__version__ = "0.1.0"

__all__ = [
    "Collector", "KroneckerVectors", "Preconditioner", "ScaleByKroneckerState", "eva",
    "eva_diagnostics", "eva_layer", "flax", "kl_clip", "kl_normalize", "no_scaling",
    "running_average", "scale_by_eva", "scale_by_kronecker",
]
