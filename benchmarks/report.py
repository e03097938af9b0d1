"""Benchmark output: per-label summary over seeds, the results table, JSON and the loss plot."""

from __future__ import annotations

import json
import math
import pathlib
from statistics import median

import numpy as np


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std())


def summarize(runs: dict) -> None:
  """Adds a ``summary`` to every label of ``runs``: final train loss and test metric (mean, std
  over seeds; NaN for a diverged seed), median step time (of the interleaved timing rounds when
  there are any, else of all training steps of all seeds), its ratio to the first ``sgd``
  label's, state bytes and whether any seed diverged."""
  for run in runs.values():
    seeds = run["seeds"]
    final = [s["evals"][-1] if not s["diverged"] else {"train_loss": math.nan, "metric": math.nan}
             for s in seeds]
    times = run.get("interleaved_step_times") or [t for s in seeds for t in s["step_times"]]
    run["summary"] = {
        "final_train_loss": _mean_std([f["train_loss"] for f in final]),
        "metric": _mean_std([f["metric"] for f in final]),
        "median_step_s": median(times) if times else None,
        "state_bytes": seeds[0]["state_bytes"],
        "diverged": any(s["diverged"] for s in seeds),
    }
  sgd = next((r["summary"]["median_step_s"] for r in runs.values() if r["optimizer"] == "sgd"),
             None)
  for run in runs.values():
    own = run["summary"]["median_step_s"]
    run["summary"]["ratio_to_sgd"] = own / sgd if sgd and own else None


def table(runs: dict, metric_name: str) -> str:
  """The results as an aligned text table, one row per label."""
  header = ["optimizer", "final train loss", metric_name, "step ms", "x SGD", "state bytes",
            "diverged"]
  rows = [header]
  for label, run in runs.items():
    s = run["summary"]
    ms = f"{1e3 * s['median_step_s']:.2f}" if s["median_step_s"] else "n/a"
    ratio = f"{s['ratio_to_sgd']:.2f}" if s["ratio_to_sgd"] else "n/a"
    rows.append([label, "{:.4f} ± {:.4f}".format(*s["final_train_loss"]),
                 "{:.4f} ± {:.4f}".format(*s["metric"]), ms, ratio, f"{s['state_bytes']:,}",
                 "yes" if s["diverged"] else "no"])
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def diagnostics_text(runs: dict) -> str:
  """Eva's per-layer ‖ā‖²‖ḡ‖²/γ_eff and removed fraction, averaged over seeds."""
  lines = []
  for label, run in runs.items():
    per_seed = [s["diagnostics"] for s in run["seeds"] if "diagnostics" in s]
    if not per_seed:
      continue
    lines.append(f"{label}: per layer at the end (mean over seeds)")
    for layer in per_seed[0]:
      ratio = np.mean([d[layer]["signal_to_damping"] for d in per_seed])
      removed = np.mean([d[layer]["removed_fraction"] for d in per_seed])
      lines.append(f"  {layer:<12} signal_to_damping {ratio:10.4g}   removed_fraction "
                   f"{removed:7.2%}")
  return "\n".join(lines)


def _finite(tree):
  """JSON-safe copy: non-finite floats become null (strict JSON has no NaN)."""
  if isinstance(tree, dict):
    return {k: _finite(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_finite(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def write_json(results: dict, path: pathlib.Path) -> None:
  """Writes ``results`` as strict JSON."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_finite(results), indent=1, allow_nan=False))


def plot(runs: dict, path: pathlib.Path, title: str, log_loss: bool) -> None:
  """Minibatch training loss against step and against wall time, one colour per label."""
  import matplotlib
  matplotlib.use("Agg")  # no display needed; safe under pytest and on servers
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for color, (label, run) in enumerate(runs.items()):
    for i, seed in enumerate(run["seeds"]):
      curve = seed["curve"]
      for ax, x in zip(axes, (curve["step"], curve["wall"])):
        ax.plot(x, curve["loss"], color=f"C{color}", lw=1, alpha=0.8,
                label=label if i == 0 else None)
  for ax, xlabel in zip(axes, ("step", "wall time (s, compile excluded)")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("minibatch train loss")
    if log_loss:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
