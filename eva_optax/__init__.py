"""eva_optax: practical second-order optimizers for JAX as Optax gradient transformations."""

from eva_optax import distributed, flax, layers, linalg, nnx
from eva_optax.accumulation import MultiStepsState, multi_steps
from eva_optax.capture.coverage import Coverage, coverage, coverage_report
from eva_optax.layers import Layout
from eva_optax.collectors import (ActivationFactor, ActivationVector, Collector,
                                  FisherEigenvectors, GradientSingularVectors,
                                  KroneckerEigenvectors, KroneckerFactors, KroneckerVectors,
                                  running_average)
from eva_optax.eva import (EvaLayerTerms, eigenvector_estimates, eva, eva_diagnostics, eva_layer,
                           scale_by_eva)
from eva_optax.eva_f import eva_f, eva_f_layer, scale_by_eva_f
from eva_optax.eva_s import EvaSState, eva_s, eva_s_direction, scale_by_eva_s
from eva_optax.foof import foof, scale_by_foof
from eva_optax import bfgs
from eva_optax.collectors import OutputVectors
from eva_optax.kbfgs import (KBFGS_STATISTICS, KBFGSFactors, KBFGSStatistics, ScaleByKBFGSState,
                             kbfgs, kbfgs_l, scale_by_kbfgs)
from eva_optax.kfac import KFACInverses, kfac, scale_by_kfac
from eva_optax.shampoo import (SHAMPOO_STATIC_ARGS, ShampooState, merge_small_dims,
                               scale_by_shampoo, shampoo)
from eva_optax.transform import (Preconditioner, ScaleByKroneckerState, kl_clip, kl_normalize,
                                 no_scaling, scale_by_kronecker)

__version__ = "0.1.0"

__all__ = [
    "KBFGS_STATISTICS", "KBFGSFactors", "KBFGSStatistics", "OutputVectors", "ScaleByKBFGSState",
    "bfgs", "kbfgs", "kbfgs_l", "scale_by_kbfgs",
    "ActivationFactor", "ActivationVector", "EvaLayerTerms", "KFACInverses", "KroneckerFactors",
    "eva_f", "eva_f_layer", "foof", "kfac", "scale_by_eva_f", "scale_by_foof", "scale_by_kfac",
    "Collector", "FisherEigenvectors", "GradientSingularVectors", "KroneckerEigenvectors", "KroneckerVectors", "eigenvector_estimates",
    "Preconditioner", "ScaleByKroneckerState", "eva",
    "eva_diagnostics", "eva_layer", "flax", "kl_clip", "kl_normalize", "no_scaling",
    "running_average", "scale_by_eva", "scale_by_kronecker",
    "EvaSState", "SHAMPOO_STATIC_ARGS", "ShampooState", "eva_s", "eva_s_direction",
    "Coverage", "Layout", "MultiStepsState", "coverage", "coverage_report", "layers",
    "multi_steps", "nnx",
    "distributed", "linalg", "merge_small_dims", "scale_by_eva_s", "scale_by_shampoo", "shampoo",
]
