"""Test setup: eight fake CPU devices (for the data-parallel tests) before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def mnist_dir() -> str:
  """``$EVA_OPTAX_DATA`` when it holds the MNIST IDX files (directly or in ``mnist/``); skips
  the test with the reason otherwise."""
  directory = os.environ.get("EVA_OPTAX_DATA")
  if not directory or not any(
      (pathlib.Path(directory) / d / "train-images-idx3-ubyte.gz").is_file()
      for d in (".", "mnist")):
    pytest.skip("MNIST IDX files not found: set EVA_OPTAX_DATA to their directory")
  return directory


def _data_dir(relative: str, what: str) -> str:
  directory = os.environ.get("EVA_OPTAX_DATA")
  if not directory or not (pathlib.Path(directory) / relative).is_file():
    pytest.skip(f"{what} not found: set EVA_OPTAX_DATA to the directory holding {relative}")
  return directory


@pytest.fixture
def cifar10_dir() -> str:
  """``$EVA_OPTAX_DATA`` when it holds ``cifar10/*.npz``; skips the test with the reason
  otherwise."""
  return _data_dir("cifar10/cifar10_test.npz", "CIFAR-10")


@pytest.fixture
def shakespeare_dir() -> str:
  """``$EVA_OPTAX_DATA`` when it holds ``tinyshakespeare/input.txt``; skips otherwise."""
  return _data_dir("tinyshakespeare/input.txt", "Tiny Shakespeare")
