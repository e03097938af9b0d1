"""Benchmarks of eva_optax against first-order Optax optimizers (``python -m benchmarks.run``)."""

import os

# jaxlib's CPU LAPACK kernels (Cholesky, eigh) call the OpenBLAS shipped with SciPy; XLA runs
# batched factorizations from several threads at once, and a multi-threaded OpenBLAS can
# deadlock under that (seen here: a K-FAC refresh of 4 stacked layers hung forever in
# block_until_ready). One OpenBLAS thread per call avoids it; XLA still parallelizes the batch.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
