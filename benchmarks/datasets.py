"""Benchmark datasets: scikit-learn's 8x8 digits (offline) and MNIST from its IDX gzip files."""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import urllib.request
from typing import NamedTuple, Optional

import numpy as np

MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# MD5 of the official release files (../shared/data/README.md).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
IMAGES_MAGIC, LABELS_MAGIC = 0x803, 0x801  # uint8 data, 3 resp. 1 dimensions
CACHE_DIR = pathlib.Path("~/.cache/eva_optax")


class Dataset(NamedTuple):
  """A fixed train/test split as numpy arrays."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits() -> Dataset:
  """scikit-learn's 1,797 8x8 digits: float32 pixels in [0, 1] of shape (64,), int32 labels.

  The 80/20 split is stratified and fixed (``random_state=0``), so every run sees the same data.
  """
  from sklearn import datasets, model_selection  # only the digits task needs scikit-learn

  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.2, random_state=0, stratify=y)
  return Dataset(x_train, y_train, x_test, y_test)


def read_idx(path, magic: int) -> np.ndarray:
  """Reads a gzip-compressed IDX file of unsigned bytes.

  Raises:
    ValueError: the magic number is not ``magic`` or the payload does not match the dimensions.
  """
  with gzip.open(path, "rb") as f:
    data = f.read()
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise ValueError(f"{path}: IDX magic number {found:#x}, expected {magic:#x}.")
  ndim = data[3]
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if payload.size != np.prod(dims):
    raise ValueError(f"{path}: {payload.size} bytes of data for dimensions {dims}.")
  return payload.reshape(dims)


def download_file(url: str, path: pathlib.Path, md5: str) -> None:
  """Downloads ``url`` to ``path`` and checks its MD5; raises ``OSError`` on any failure."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".part")
  # Write to a side file first so an interrupted download never looks like a complete one.
  with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
    f.write(response.read())
  digest = hashlib.md5(partial.read_bytes()).hexdigest()
  if digest != md5:
    partial.unlink()
    raise OSError(f"{url}: MD5 {digest}, expected {md5}.")
  partial.replace(path)


def _mnist_dir(data_dir: Optional[str]) -> pathlib.Path:
  """Finds a directory holding the four files, downloading them when none does."""
  if data_dir is not None:
    root, is_cache = pathlib.Path(data_dir).expanduser(), False
  elif os.environ.get("EVA_OPTAX_DATA"):
    root, is_cache = pathlib.Path(os.environ["EVA_OPTAX_DATA"]).expanduser(), False
  else:
    root, is_cache = CACHE_DIR.expanduser(), True
  candidates = [root, root / "mnist"]
  for directory in candidates:
    if all((directory / name).is_file() for name in MNIST_MD5):
      return directory
  target = root / "mnist" if is_cache else root
  try:
    for name, md5 in MNIST_MD5.items():
      if not (target / name).is_file():
        download_file(MNIST_URL + name, target / name, md5)
  except OSError as error:
    raise FileNotFoundError(
        f"MNIST not found: looked for {', '.join(MNIST_MD5)} in "
        f"{' and '.join(str(c) for c in candidates)}, and downloading them from {MNIST_URL} "
        f"into {target} failed ({error}). Put the four files in a directory and pass "
        "--data-dir DIR (data_dir=DIR) or set EVA_OPTAX_DATA=DIR.") from error
  return target


def load_mnist(data_dir: Optional[str] = None) -> Dataset:
  """MNIST: float32 images in [0, 1] of shape (N, 28, 28, 1), int32 labels; 60k train, 10k test.

  Args:
    data_dir: directory holding the four IDX gzip files, directly or in a ``mnist/`` subfolder.
      Defaults to ``$EVA_OPTAX_DATA``, else ``~/.cache/eva_optax``. Missing files are downloaded
      there (into ``mnist/`` for the cache) and checked against their MD5.

  Raises:
    FileNotFoundError: the files are absent and the download failed.
    ValueError: a file is not an IDX file of the expected kind.
  """
  directory = _mnist_dir(data_dir)

  def images(name):
    return (read_idx(directory / name, IMAGES_MAGIC)[..., None] / 255.0).astype(np.float32)

  def labels(name):
    return read_idx(directory / name, LABELS_MAGIC).astype(np.int32)

  return Dataset(images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
                 images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def _shared_root(data_dir: Optional[str]) -> pathlib.Path:
  """``data_dir``, else ``$EVA_OPTAX_DATA``, else ``../shared/data`` (the workplace's copy)."""
  return pathlib.Path(data_dir or os.environ.get("EVA_OPTAX_DATA") or "../shared/data").expanduser()


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found at {path}; pass --data-dir DIR (data_dir=DIR) or "
                            "set EVA_OPTAX_DATA=DIR to the directory that holds it.")
  return path


CIFAR10_TRAIN_SHARDS = 5  # cifar10_train_0.npz .. cifar10_train_4.npz (data_batch_1..5)


def load_cifar10(data_dir: Optional[str] = None) -> Dataset:
  """CIFAR-10 from ``<data_dir>/cifar10/*.npz``: uint8 images ``(N, 32, 32, 3)`` (HWC, RGB) and
  int32 labels; 50,000 train images in the official order, 10,000 test images.

  Raises:
    FileNotFoundError: a shard is absent (the message names it and the fix).
  """
  root = _shared_root(data_dir) / "cifar10"

  def shard(name):
    with np.load(_require(root / f"{name}.npz", "CIFAR-10 shard")) as arrays:
      return arrays["images"], arrays["labels"].astype(np.int32)

  train = [shard(f"cifar10_train_{i}") for i in range(CIFAR10_TRAIN_SHARDS)]
  x_test, y_test = shard("cifar10_test")
  return Dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                 x_test, y_test)


class Text(NamedTuple):
  """A character corpus as int32 ids of its sorted symbol set."""

  ids: np.ndarray
  vocabulary: str


# The 65 symbols of Tiny Shakespeare, sorted (the model's vocabulary is fixed before any data
# is read).
SHAKESPEARE_VOCABULARY = "\n !$&',-.3:;?" + "".join(map(chr, range(65, 91))) + "".join(
    map(chr, range(97, 123)))


def load_shakespeare(data_dir: Optional[str] = None) -> Text:
  """Tiny Shakespeare (``<data_dir>/tinyshakespeare/input.txt``, 1,115,394 characters) as
  int32 ids into :data:`SHAKESPEARE_VOCABULARY` (its 65 sorted symbols).

  Raises:
    FileNotFoundError: the file is absent (the message names it and the fix).
    ValueError: the file holds symbols outside that vocabulary.
  """
  path = _require(_shared_root(data_dir) / "tinyshakespeare" / "input.txt", "Tiny Shakespeare")
  text = path.read_text()
  unknown = set(text) - set(SHAKESPEARE_VOCABULARY)
  if unknown:
    raise ValueError(f"{path} holds symbols outside Tiny Shakespeare's 65: {sorted(unknown)}.")
  table = np.zeros(128, np.int32)  # the vocabulary is ASCII
  table[[ord(c) for c in SHAKESPEARE_VOCABULARY]] = np.arange(len(SHAKESPEARE_VOCABULARY))
  return Text(table[np.frombuffer(text.encode("ascii"), np.uint8)], SHAKESPEARE_VOCABULARY)


def split_text(text: Text, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
  """The first ``train_fraction`` of the ids for training, the rest for validation."""
  cut = int(train_fraction * len(text.ids))
  return text.ids[:cut], text.ids[cut:]


def language_model_data(text: Text, context: int, held_out_every: int = 3) -> Dataset:
  """Next-character prediction data: every training window of ``context`` + 1 characters (a
  strided view, no copy; ``x`` = the first ``context``, ``y`` = the next character at each
  position), and a fixed held-out set: every ``held_out_every``-th non-overlapping window of
  the validation split (572 windows, 36,608 predictions for Tiny Shakespeare at context 64)."""
  train, valid = split_text(text)
  windows = np.lib.stride_tricks.sliding_window_view(train, context + 1)
  held_out = valid[:len(valid) // (context + 1) * (context + 1)].reshape(-1, context + 1)
  held_out = held_out[::held_out_every]
  return Dataset(windows[:, :-1], windows[:, 1:], held_out[:, :-1], held_out[:, 1:])


def augment_crop_flip(rng: np.random.Generator, images: np.ndarray, pad: int = 4) -> np.ndarray:
  """The standard CIFAR augmentation (He et al. 2016): zero-pad by ``pad`` pixels, take a random
  crop of the original size, flip horizontally with probability ½. ``images``: ``(B, H, W, C)``."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy, dx = rng.integers(0, 2 * pad + 1, (2, b))
  rows = dy[:, None] + np.arange(h)
  cols = dx[:, None] + np.arange(w)
  flip = rng.random(b) < 0.5
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
