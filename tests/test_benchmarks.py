"""Benchmark CLI: IDX loading, the optimizer-entry syntax and short end-to-end runs."""

import gzip
import json
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import eva_optax
from benchmarks import datasets, kfac_jax_peer, models, optimizers, run, train


def write_idx(path, array, magic):
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(directory, n_train=3, n_test=2, seed=0):
  """Tiny synthetic MNIST in the standard file names; returns the arrays written."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    write_idx(directory / f"{split}-images-idx3-ubyte.gz", images, datasets.IMAGES_MAGIC)
    write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels, datasets.LABELS_MAGIC)
    arrays[split] = images, labels
  return arrays


@pytest.fixture
def offline(monkeypatch):
  """Any download attempt fails, as without network."""
  def fail(url, path, md5):
    raise OSError(f"offline: {url}")
  monkeypatch.setattr(datasets, "download_file", fail)


def test_idx_round_trip(tmp_path, offline):
  arrays = write_mnist(tmp_path / "mnist")
  data = datasets.load_mnist(str(tmp_path))  # found in the mnist/ subfolder
  images, labels = arrays["train"]
  assert data.x_train.shape == (3, 28, 28, 1) and data.x_train.dtype == np.float32
  assert data.x_test.shape == (2, 28, 28, 1)
  np.testing.assert_allclose(data.x_train[..., 0], images / 255.0, rtol=1e-6)
  assert data.y_train.dtype == np.int32
  np.testing.assert_array_equal(data.y_train, labels)
  np.testing.assert_array_equal(data.y_test, arrays["t10k"][1])


def test_environment_variable_points_at_the_files(tmp_path, monkeypatch, offline):
  write_mnist(tmp_path)
  monkeypatch.setenv("EVA_OPTAX_DATA", str(tmp_path))
  assert datasets.load_mnist().x_train.shape == (3, 28, 28, 1)


def test_bad_magic_raises(tmp_path):
  path = tmp_path / "labels.gz"
  write_idx(path, np.zeros((4,), np.uint8), datasets.IMAGES_MAGIC)
  with pytest.raises(ValueError, match="magic"):
    datasets.read_idx(path, datasets.LABELS_MAGIC)


def test_missing_files_name_the_directory(tmp_path, offline):
  with pytest.raises(FileNotFoundError) as error:
    datasets.load_mnist(str(tmp_path / "nowhere"))
  message = str(error.value)
  assert str(tmp_path / "nowhere") in message
  assert "train-images-idx3-ubyte.gz" in message and "EVA_OPTAX_DATA" in message


def test_missing_files_in_default_cache(tmp_path, monkeypatch, offline):
  monkeypatch.delenv("EVA_OPTAX_DATA", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="--data-dir") as error:
    datasets.load_mnist()
  assert str(tmp_path / ".cache" / "eva_optax" / "mnist") in str(error.value)


def test_parse_entry():
  config = optimizers.parse_entry("eva:lr=0.3:damping_mode=absolute:scaling=none")
  assert config.label == "eva:lr=0.3:damping_mode=absolute:scaling=none"
  assert config.name == "eva" and config.lr == 0.3
  assert config.kwargs == {"damping_mode": "absolute", "scaling": None}
  # the signature default:
  assert optimizers.make_kwargs(config, "digits_mlp")["relative_damping"] == 0.5
  # per-task registry defaults apply on their task only, and the command line wins over them
  kfac = optimizers.parse_entry("kfac")
  assert optimizers.make_kwargs(kfac, "mnist_autoencoder")["damping"] == 10.0
  assert optimizers.make_kwargs(kfac, "mnist_cnn")["damping"] == 1e-3
  assert optimizers.make_kwargs(optimizers.parse_entry("kfac:damping=0.5"),
                                "mnist_autoencoder")["damping"] == 0.5
  assert optimizers.parse_entry("sgd").kwargs == {}
  for bad in ("nadam", "eva:dampng=1", "eva:damping"):
    with pytest.raises(ValueError):
      optimizers.parse_entry(bad)


def test_digits_run(tmp_path):
  results = run.main(["--task", "digits_mlp", "--steps", "30", "--optimizers", "sgd,adam,eva",
                      "--out", str(tmp_path)])
  assert (tmp_path / "digits_mlp.png").is_file()
  written = json.loads((tmp_path / "digits_mlp.json").read_text())
  assert set(written["runs"]) == {"sgd", "adam", "eva"}
  assert written["environment"]["platform"] == "cpu"
  for label, entry in results["runs"].items():
    evals = entry["seeds"][0]["evals"]
    assert not entry["summary"]["diverged"], label
    assert math.isfinite(evals[-1]["train_loss"])
    assert evals[-1]["train_loss"] < evals[0]["train_loss"], label
    assert len(entry["seeds"][0]["curve"]["loss"]) == 30
  diagnostics = results["runs"]["eva"]["seeds"][0]["diagnostics"]
  assert set(diagnostics) == {"Dense_0", "Dense_1"}
  for values in diagnostics.values():
    assert set(values) == {"signal_to_damping", "removed_fraction", "g_norm"}
  assert results["runs"]["sgd"]["summary"]["step_ratio"] == 1.0


def test_kronecker_baselines_and_the_kfac_jax_peer_run(tmp_path):
  names = ["kfac", "kfac_jax", "foof", "eva_f"]
  results = run.main(["--task", "digits_mlp", "--steps", "20", "--optimizers", ",".join(names),
                      "--timing-rounds", "3", "--out", str(tmp_path), "--no-plot"])
  for label in names:
    entry = results["runs"][label]
    evals = entry["seeds"][0]["evals"]
    assert not entry["summary"]["diverged"], label
    assert evals[-1]["train_loss"] < 0.5 * evals[0]["train_loss"], label
  # Both K-FACs hold the same Kronecker factors (and inverses) of the same layers.
  ours, peer = (results["runs"][k]["seeds"][0]["state_bytes"] for k in ("kfac", "kfac_jax"))
  assert abs(ours - peer) < 0.01 * ours


@pytest.mark.parametrize("scaling, kl_clip", [(None, 1e-3), ("kl_clip", 1e-4)])
def test_kfac_jax_peer_takes_the_same_steps_as_ours(scaling, kl_clip):
  # With stat_decay = 1 both running averages are the current batch's factors (kfac-jax's
  # bias-corrected average and ours differ otherwise), and with a constant learning rate both
  # momentum forms agree (kfac-jax's velocity holds η-scaled steps), so three steps compare the
  # unit conversion, the damping split, the KL clip, momentum and the refresh steps (T = 2).
  task = models.TASKS["digits_mlp"]()
  data = task.prepare(task.load(None))
  params = task.model.init(jax.random.key(0), data.x_train[:1])["params"]
  settings = dict(damping=0.1, stat_decay=1.0, inverse_update_period=2, scaling=scaling,
                  kl_clip=kl_clip, momentum=0.9)
  lr = 0.3
  ours, peer = eva_optax.kfac(lr, **settings), kfac_jax_peer.kfac_jax_peer(lr, **settings)
  trajectories = []
  for tx, statistics in ((ours, "kronecker_factors"), (peer, None)):
    step = train.make_step(task, tx, statistics)
    p = jax.tree.map(jnp.copy, params)
    state = train.init_state(tx, p, data.x_train[:64], data.y_train[:64])
    for i in range(3):
      batch = slice(64 * i, 64 * (i + 1))
      p, state, _ = step(p, state, data.x_train[batch], data.y_train[batch])
    trajectories.append(jax.tree.map(lambda new, old: new - old, p, params))
  # float32 factors and inverses computed by different code: measured agreement 5e-6 of each
  # layer's largest displacement; any convention difference (a factor B = 64 in G or in the
  # damping, the momentum form under a schedule) moves entries by percents.
  for mine, theirs in zip(jax.tree.leaves(trajectories[0]), jax.tree.leaves(trajectories[1])):
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=5e-5 * float(jnp.abs(theirs).max()))


def test_cnn_run_on_synthetic_mnist(tmp_path, offline):
  write_mnist(tmp_path, n_train=64, n_test=16)
  results = run.main(["--task", "mnist_cnn", "--steps", "3", "--batch-size", "16",
                      "--optimizers", "eva:lr=0.05", "--data-dir", str(tmp_path),
                      "--out", str(tmp_path), "--no-plot"])
  entry = results["runs"]["eva:lr=0.05"]
  assert entry["summary"]["step_ratio"] is None  # no sgd in this process
  assert set(entry["seeds"][0]["diagnostics"]) == {"Conv_0", "Conv_1", "Conv_2", "Dense_0",
                                                   "Dense_1"}
  assert not (tmp_path / "mnist_cnn.png").exists()


@pytest.mark.data
def test_real_mnist(mnist_dir):
  data = datasets.load_mnist(mnist_dir)
  assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
  assert np.bincount(data.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                               1009]
  assert abs(data.x_train.mean() - 0.1307) < 1e-3


def test_transformer_step_benchmark_runs_and_reports_every_layer_kind(tmp_path):
  from benchmarks import transformer_step
  (tmp_path / "tinyshakespeare").mkdir()
  (tmp_path / "tinyshakespeare" / "input.txt").write_text("to be, or not to be:\n" * 50)
  results = transformer_step.main([
      "--data-dir", str(tmp_path), "--batch", "4", "--context", "8", "--width", "16",
      "--depth", "2", "--heads", "2", "--train-steps", "3", "--rounds", "2",
      "--optimizers", "adamw,eva,kbfgs_l", "--out", str(tmp_path / "out.json")])
  assert {"adamw", "eva", "kbfgs_l"} <= set(results)
  assert all(math.isfinite(results[k]["median_step_s"]) for k in ("adamw", "eva", "kbfgs_l"))
  layers = results["eva"]["diagnostics"]
  assert any(name.endswith("key") for name in layers) and "head" in layers
  assert results["capture_overhead"]["capture"] > 0
  assert json.loads((tmp_path / "out.json").read_text())["eva"]["diagnostics"] == layers


def test_sharding_memory_counts_shards_of_params_and_state(tmp_path):
  # The 8 fake devices of conftest.py give the 2 × 4 mesh. Per device: SGD-momentum's params and
  # momentum are sharded by the same rule, so they shrink alike; K-FAC's replicated factors do
  # not shrink, so its ratio is larger.
  from benchmarks import sharding_memory
  (tmp_path / "tinyshakespeare").mkdir()
  (tmp_path / "tinyshakespeare" / "input.txt").write_text("to be, or not to be:\n" * 300)
  results = sharding_memory.main(["--data-dir", str(tmp_path), "--optimizers",
                                  "sgd_nesterov,kfac"])
  sgd, kfac = results["sgd_nesterov"], results["kfac"]
  assert sgd["sharded"] < sgd["replicated"] / 4
  assert kfac["replicated"] > sgd["replicated"]
  assert kfac["sharded"] / kfac["replicated"] > sgd["sharded"] / sgd["replicated"]


def test_refresh_cost_times_redundant_and_spread_refreshes(tmp_path):
  from benchmarks import refresh_cost
  out = tmp_path / "refresh.json"
  refresh_cost.main(["--devices", "1,2", "--widths", "8", "--layers", "3", "--repeats", "1",
                     "--methods", "kfac_cholesky,shampoo_newton", "--out", str(out)])
  table = json.loads(out.read_text())["by_devices"]
  assert set(table) == {"kfac_cholesky/8", "shampoo_newton/8"}
  for rows in table.values():
    assert [r["devices"] for r in rows] == [1, 2]
    assert all(r["redundant"] > 0 and r["spread"] > 0 for r in rows)
