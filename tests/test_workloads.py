"""The real workloads of the benchmark (CIFAR-10 ResNet-20, Tiny-Shakespeare Transformer): data
loaders against the data README's facts, augmentation, Muon's parameter split, time to target,
and both tasks end to end on a tiny configuration."""

import json
import math

import jax
import numpy as np
import pytest

from benchmarks import datasets, models, optimizers, report, run, train


def test_cifar10_loader_matches_the_data_readme(cifar10_dir):
  data = datasets.load_cifar10(cifar10_dir)
  assert data.x_train.shape == (50000, 32, 32, 3) and data.x_train.dtype == np.uint8
  assert data.x_test.shape == (10000, 32, 32, 3)
  assert data.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
  assert data.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
  assert np.bincount(data.y_train).tolist() == [5000] * 10
  assert np.bincount(data.y_train[:10000]).tolist() == [1005, 974, 1032, 1016, 999, 937, 1030,
                                                        1001, 1025, 981]
  assert np.bincount(data.y_test).tolist() == [1000] * 10
  # The README's per-channel statistics of pixel / 255, to its 4 printed digits.
  mean = data.x_train.reshape(-1, 3).mean(axis=0) / 255
  np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=6e-5)
  prepared = models.get_task("cifar10_resnet").prepare(data)
  pixels = prepared.x_train.reshape(-1, 3)
  # (float64 accumulation: numpy sums a float32 column of 51 M values with visible error)
  np.testing.assert_allclose(pixels.mean(axis=0, dtype=np.float64), 0.0, atol=1e-5)
  np.testing.assert_allclose(pixels.std(axis=0, dtype=np.float64), 1.0, atol=1e-5)


def test_shakespeare_loader_and_windows(shakespeare_dir):
  text = datasets.load_shakespeare(shakespeare_dir)
  assert len(text.ids) == 1115394 and len(text.vocabulary) == 65
  assert text.vocabulary == datasets.SHAKESPEARE_VOCABULARY
  raw = (__import__("pathlib").Path(shakespeare_dir) / "tinyshakespeare/input.txt").read_text()
  assert "".join(text.vocabulary[i] for i in text.ids[:60]) == raw[:60]
  train_ids, valid_ids = datasets.split_text(text)
  assert len(train_ids) == int(0.9 * 1115394) and len(train_ids) + len(valid_ids) == 1115394
  data = datasets.language_model_data(text, 64)
  assert data.x_train.shape == (len(train_ids) - 64, 64)
  # y is x shifted by one character, in training and held-out windows alike.
  np.testing.assert_array_equal(data.x_train[1000, 1:], data.y_train[1000, :-1])
  np.testing.assert_array_equal(data.y_train[1000], train_ids[1001:1065])
  assert len(valid_ids) // 65 == 1716 and data.x_test.shape == (572, 64)  # every third
  np.testing.assert_array_equal(data.x_test[1], valid_ids[195:259])
  np.testing.assert_array_equal(data.y_test[1], valid_ids[196:260])


def test_augmentation_is_a_padded_crop_and_flip():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  out = datasets.augment_crop_flip(np.random.default_rng(7), images, pad=2)
  draws = np.random.default_rng(7)
  dy, dx = draws.integers(0, 5, (2, 16))
  flip = draws.random(16) < 0.5
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(16):
    expected = padded[i, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
    np.testing.assert_array_equal(out[i], expected[:, ::-1] if flip[i] else expected)
  assert 0 < flip.sum() < 16 and len(set(dy.tolist())) > 1


def test_muon_takes_the_hidden_matrices_and_adam_the_rest():
  task = models.get_task("shakespeare_char")
  tokens = np.zeros((2, 64), np.int32)
  params, state = task.init(jax.random.key(0), tokens)
  info, _ = train.capture_info(train.loss_fn(task), params, tokens, tokens)
  numbers = optimizers.muon_dimension_numbers(params, info.layouts, task.head)
  attention = numbers["blocks"]["MultiHeadDotProductAttention_0"]
  assert attention["query"]["kernel"] == optax_dims((1,), (2, 3))  # [L, d, heads, head_dim]
  assert attention["out"]["kernel"] == optax_dims((1, 2), (3,))    # [L, heads, head_dim, d]
  assert numbers["blocks"]["Dense_0"]["kernel"] == optax_dims((1,), (2,))
  for adam in (numbers["head"]["kernel"], numbers["Embed_0"]["embedding"],
               numbers["blocks"]["Dense_0"]["bias"], numbers["LayerNorm_0"]["scale"]):
    assert adam is None


def optax_dims(reduction, output):
  import optax
  return optax.contrib.MuonDimensionNumbers(reduction, output)


def _evals(metrics, walls):
  return [{"step": 10 * i, "wall": w, "metric": m} for i, (m, w) in enumerate(zip(metrics,
                                                                                 walls))]


def test_time_to_target_on_synthetic_curves():
  rising = _evals([0.1, 0.5, float("nan"), 0.79, 0.81, 0.9], [0, 1, 2, 3, 4, 5])
  assert report.reach(rising, 0.8, "max") == {"step": 40, "wall": 4}
  assert report.reach(rising, 0.95, "max") is None
  assert report.best_metric(rising, "max") == 0.9
  falling = _evals([4.0, 2.5, 1.99, 1.87], [0, 2, 4, 6])
  assert report.reach(falling, 2.0, "min") == {"step": 20, "wall": 4}
  assert report.reach(falling, 1.88, "min") == {"step": 30, "wall": 6}
  seed = lambda evals: {"evals": evals, "diverged": False, "step_times": [0.5],
                        "state_bytes": 8}
  runs = {"adamw": {"optimizer": "adamw", "seeds": [seed(falling), seed(falling)],
                    "interleaved_step_times": [0.5, 0.5]},
          "eva": {"optimizer": "eva", "seeds": [seed(_evals([4.0, 1.9, 1.8, 1.7], [0, 1, 2, 3])),
                                                seed(_evals([4.0, 2.1, 1.95, 1.9], [0, 1, 2, 3]))],
                  "interleaved_step_times": [0.25]}}
  settings = {"goal": "min", "targets": [2.0, 1.88], "baseline": "adamw"}
  report.summarize(runs, settings)
  eva = runs["eva"]["summary"]["targets"]
  assert eva["2.0"]["steps"] == 15.0 and eva["2.0"]["steps_ratio"] == 0.75
  # Steps × the interleaved median step: 15 × 0.25 s against AdamW's 20 × 0.5 s.
  assert eva["2.0"]["wall_interleaved_s_ratio"] == pytest.approx(3.75 / 10.0)
  assert eva["1.88"]["reached"] == 1 and "steps" not in eva["1.88"]
  assert eva["1.88"]["best"] == pytest.approx((1.7 + 1.9) / 2)
  assert runs["eva"]["summary"]["step_ratio"] == 0.5
  text = report.targets_table(runs, settings)
  assert "not reached (1/2)" in text and "0.75" in text


def test_cifar10_resnet_runs_end_to_end(cifar10_dir, tmp_path):
  results = run.main([
      "--task", "cifar10_resnet", "--data-dir", cifar10_dir, "--steps", "4", "--batch-size",
      "16", "--train-subset", "256", "--test-subset", "64", "--eval-every", "2",
      "--optimizers", "sgd_nesterov,eva,muon", "--timing-rounds", "2", "--targets", "0.05,0.99",
      "--out", str(tmp_path)])
  assert (tmp_path / "cifar10_resnet.png").is_file()
  for label, entry in results["runs"].items():
    evals = entry["seeds"][0]["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4], label
    assert all(math.isfinite(e["test_loss"]) for e in evals), label
    assert entry["summary"]["targets"]["0.05"]["reached"] == 1, label
    assert entry["summary"]["targets"]["0.99"]["reached"] == 0, label
  assert results["settings"]["baseline"] == "sgd_nesterov"
  assert results["runs"]["sgd_nesterov"]["summary"]["step_ratio"] == 1.0
  # Eva sees every convolution and the head (BatchNorm parameters are not kernels).
  assert len(results["runs"]["eva"]["seeds"][0]["diagnostics"]) == 22
  written = json.loads((tmp_path / "cifar10_resnet.json").read_text())
  assert written["settings"]["targets"] == [0.05, 0.99]


def test_batch_statistics_are_carried_and_used_in_evaluation(cifar10_dir):
  task = models.get_task("cifar10_resnet")
  data = task.prepare(datasets.load_cifar10(cifar10_dir))
  params, model_state = task.init(jax.random.key(0), data.x_train[:1])
  step = train.make_step(task, optimizers.sgd_nesterov(0.1), None)
  state = train.init_state(optimizers.sgd_nesterov(0.1), params, None, None, model_state)
  sampler = train.Sampler(data, [np.arange(64)], 32, 0, task.augment)
  params, state, _ = step(params, state, *sampler.batch(0))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), model_state, state[1])
  assert min(jax.tree.leaves(moved)) > 0  # every running mean/variance was updated
  # Evaluation reads the running averages it is given (not the batch's statistics).
  x, y = data.x_test[:32], data.y_test[:32]
  assert task.test_loss(params, x, y, model_state) != task.test_loss(params, x, y, state[1])


def test_shakespeare_char_runs_end_to_end(shakespeare_dir, tmp_path):
  results = run.main([
      "--task", "shakespeare_char", "--data-dir", shakespeare_dir, "--steps", "4",
      "--test-subset", "16", "--eval-subset", "16", "--eval-every", "2",
      "--optimizers", "adamw,muon,eva,kfac", "--timing-rounds", "2",
      "--targets", "10.0,1.0", "--out", str(tmp_path), "--no-plot"])
  assert results["settings"]["schedule"] == "warmup_cosine"
  assert results["settings"]["baseline"] == "adamw"
  for label, entry in results["runs"].items():
    evals = entry["seeds"][0]["evals"]
    assert evals[-1]["metric"] < evals[0]["metric"], label  # validation loss falls
    assert entry["summary"]["targets"]["10.0"]["steps"] == 0.0, label
    assert entry["summary"]["targets"]["1.0"]["reached"] == 0, label
  assert results["runs"]["adamw"]["summary"]["step_ratio"] == 1.0
  assert any("key" in layer for layer in results["runs"]["eva"]["seeds"][0]["diagnostics"])


def _result_file(path, label, seed, steps=100, times=None):
  evals = [{"step": 0, "wall": 0.0, "metric": 4.0, "train_loss": 4.0},
           {"step": steps, "wall": 9.0, "metric": 1.9 + seed / 100, "train_loss": 1.9}]
  run = {"optimizer": label.split(":")[0], "lr": 1e-3, "kwargs": {},
         "seeds": [{"seed": seed, "evals": evals, "diverged": False, "step_times": [0.1],
                    "state_bytes": 8, "curve": {"step": [], "loss": [], "wall": []}}]}
  if times:
    run["interleaved_step_times"] = times
  settings = {"total_steps": steps, "batch_size": 12, "schedule": "cosine", "seeds": [seed],
              "goal": "min", "targets": [2.0], "baseline": "adamw", "metric_name": "loss"}
  report.write_json({"task": "t", "settings": settings, "environment": {"platform": "cpu"},
                     "runs": {label: run}}, path)
  return str(path)


def test_merge_concatenates_seeds_and_takes_the_timing_file(tmp_path):
  files = [_result_file(tmp_path / f"{label}{seed}.json", label, seed)
           for label in ("adamw", "eva") for seed in (0, 1)]
  timing = _result_file(tmp_path / "timing.json", "eva", 0, steps=20, times=[0.2, 0.4])
  merged = report.merge(files, timing)
  assert [s["seed"] for s in merged["runs"]["eva"]["seeds"]] == [0, 1]
  assert merged["runs"]["eva"]["interleaved_step_times"] == [0.2, 0.4]
  assert merged["settings"]["seeds"] == [0, 1]
  report.summarize(merged["runs"], merged["settings"])
  assert merged["runs"]["eva"]["summary"]["median_step_s"] == pytest.approx(0.3)
  assert merged["runs"]["adamw"]["summary"]["targets"]["2.0"]["steps"] == 100.0
  with pytest.raises(ValueError, match="total_steps"):
    report.merge([files[0], timing])
