"""Benchmark output: per-label summary over seeds, the results and time-to-target tables, JSON
and the plots; and a CLI that merges result files of the same task (e.g. one process per seed)::

    python -m benchmarks.report benchmarks/out/seed0/shakespeare_char.json \\
        benchmarks/out/seed1/shakespeare_char.json --out benchmarks/out/merged
"""

from __future__ import annotations

import json
import math
import pathlib
from statistics import median
from typing import Optional

import numpy as np


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std())


def reach(evals: list, target: float, goal: str) -> Optional[dict]:
  """The first evaluation whose metric reaches ``target`` (``>=`` for ``goal="max"``, ``<=``
  for ``"min"``) as ``{"step", "wall"}``, or ``None`` (AlgoPerf's time-to-target: the run's
  steps and step-execution seconds, compilation excluded, before that evaluation)."""
  for e in evals:
    value = e.get("metric")
    if value is not None and math.isfinite(value) and (
        value >= target if goal == "max" else value <= target):
      return {"step": e["step"], "wall": e["wall"]}
  return None


def best_metric(evals: list, goal: str) -> float:
  """The best finite metric of a run's evaluations (NaN if none is finite)."""
  values = [e["metric"] for e in evals if e.get("metric") is not None and
            math.isfinite(e["metric"])]
  return (max if goal == "max" else min)(values) if values else math.nan


def _time_to_target(run: dict, target: float, goal: str) -> dict:
  """Over seeds: how many reached ``target``; when all did, the mean steps, the mean measured
  seconds, and steps × the run's median (interleaved) step time; the mean best metric."""
  hits = [reach(s["evals"], target, goal) for s in run["seeds"]]
  out = {"reached": sum(h is not None for h in hits), "seeds": len(hits),
         "best": _mean_std([best_metric(s["evals"], goal) for s in run["seeds"]])[0]}
  if all(hits):
    steps = float(np.mean([h["step"] for h in hits]))
    out.update(steps=steps, wall_s=float(np.mean([h["wall"] for h in hits])))
    if run["summary"]["median_step_s"]:
      out["wall_interleaved_s"] = steps * run["summary"]["median_step_s"]
  return out


def summarize(runs: dict, settings: dict) -> None:
  """Adds a ``summary`` to every label of ``runs``: final train loss, test metric and test loss
  (mean, std over seeds; NaN for a diverged seed), median step time (of the interleaved timing
  rounds when there are any, else of all training steps of all seeds), its ratio to the first
  label of the ``settings["baseline"]`` optimizer, state bytes, whether any seed diverged, and
  per ``settings["targets"]`` entry the time to target (:func:`_time_to_target`) with its
  ratios to the baseline's."""
  for run in runs.values():
    seeds = run["seeds"]
    nan = {"train_loss": math.nan, "metric": math.nan, "test_loss": math.nan}
    final = [nan if s["diverged"] else {**nan, **s["evals"][-1]} for s in seeds]
    times = run.get("interleaved_step_times") or [t for s in seeds for t in s["step_times"]]
    run["summary"] = {
        "final_train_loss": _mean_std([f["train_loss"] for f in final]),
        "metric": _mean_std([f["metric"] for f in final]),
        "test_loss": _mean_std([f["test_loss"] for f in final]),
        "median_step_s": median(times) if times else None,
        "state_bytes": seeds[0]["state_bytes"],
        "diverged": any(s["diverged"] for s in seeds),
    }
    run["summary"]["targets"] = {str(t): _time_to_target(run, t, settings["goal"])
                                 for t in settings["targets"]}
  base = next((r["summary"] for r in runs.values() if r["optimizer"] == settings["baseline"]),
              None)
  for run in runs.values():
    summary = run["summary"]
    own = summary["median_step_s"]
    summary["step_ratio"] = own / base["median_step_s"] if base and base[
        "median_step_s"] and own else None
    for target, entry in summary["targets"].items():
      theirs = base["targets"][target] if base else {}
      for key in ("steps", "wall_interleaved_s"):
        if key in entry and theirs.get(key):
          entry[f"{key}_ratio"] = entry[key] / theirs[key]


def run_line(result: dict, settings: dict) -> str:
  """One finished run in a line: final metric, best metric and the steps to each target."""
  if result["diverged"]:
    return f"diverged at step {result['diverged_step']}"
  evals, goal = result["evals"], settings["goal"]
  parts = [f"train loss {evals[-1]['train_loss']:.4f}, {settings['metric_name']} "
           f"{evals[-1]['metric']:.4f} (best {best_metric(evals, goal):.4f})"]
  for target in settings["targets"]:
    hit = reach(evals, target, goal)
    parts.append(f"{target}: " + (f"step {hit['step']}, {hit['wall']:.0f} s" if hit else
                                  "not reached"))
  return ", ".join(parts)


def _aligned(rows: list) -> str:
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def table(runs: dict, metric_name: str, baseline: str = "sgd") -> str:
  """The results as an aligned text table, one row per label."""
  header = ["optimizer", "final train loss", metric_name, "step ms", f"x {baseline}",
            "state bytes", "diverged"]
  rows = [header]
  for label, run in runs.items():
    s = run["summary"]
    ms = f"{1e3 * s['median_step_s']:.2f}" if s["median_step_s"] else "n/a"
    ratio = f"{s['step_ratio']:.2f}" if s["step_ratio"] else "n/a"
    rows.append([label, "{:.4f} ± {:.4f}".format(*s["final_train_loss"]),
                 "{:.4f} ± {:.4f}".format(*s["metric"]), ms, ratio, f"{s['state_bytes']:,}",
                 "yes" if s["diverged"] else "no"])
  return _aligned(rows)


def targets_table(runs: dict, settings: dict) -> str:
  """Time to each target per label: mean steps and seconds over seeds (measured, and steps ×
  the interleaved median step time) with their ratios to the baseline, or "not reached" with
  the number of seeds that did and the mean best value."""
  base = settings["baseline"]
  rows = [["optimizer", "target", "steps", f"x {base}", "measured s", "steps x step s",
           f"x {base}", "best (mean)"]]
  for label, run in runs.items():
    for target, e in run["summary"]["targets"].items():
      if "steps" not in e:
        rows.append([label, target, f"not reached ({e['reached']}/{e['seeds']})", "", "", "",
                     "", f"{e['best']:.4f}"])
        continue
      ratio = lambda key: f"{e[key]:.2f}" if key in e else "n/a"
      rows.append([label, target, f"{e['steps']:.0f}", ratio("steps_ratio"),
                   f"{e['wall_s']:.1f}", f"{e.get('wall_interleaved_s', math.nan):.1f}",
                   ratio("wall_interleaved_s_ratio"), f"{e['best']:.4f}"])
  return _aligned(rows)


def diagnostics_text(runs: dict) -> str:
  """Eva's per-layer ‖ā‖²‖ḡ‖²/γ_eff, removed fraction and ‖ḡ‖ (smallest stack slice's),
  averaged over seeds."""
  lines = []
  for label, run in runs.items():
    per_seed = [s["diagnostics"] for s in run["seeds"] if "diagnostics" in s]
    if not per_seed:
      continue
    lines.append(f"{label}: per layer at the end (mean over seeds)")
    width = max(len(layer) for layer in per_seed[0])
    for layer in per_seed[0]:
      mean = lambda key: np.mean([d[layer].get(key, math.nan) for d in per_seed])
      lines.append(f"  {layer:<{width}} signal_to_damping {mean('signal_to_damping'):10.4g}   "
                   f"removed_fraction {mean('removed_fraction'):7.2%}   "
                   f"|g| {mean('g_norm'):9.2e}")
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


def plot(runs: dict, path: pathlib.Path, title: str, log_loss: bool,
         metric_name: str = "metric") -> None:
  """Minibatch training loss (top) and the evaluated metric (bottom) against step and against
  wall time (step execution, compilation excluded), one colour per label, one line per seed."""
  import matplotlib
  matplotlib.use("Agg")  # no display needed; safe under pytest and on servers
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  for color, (label, run) in enumerate(runs.items()):
    for i, seed in enumerate(run["seeds"]):
      curve, evals = seed["curve"], seed["evals"]
      metric = [e["metric"] for e in evals]
      for column, key in enumerate(("step", "wall")):
        style = dict(color=f"C{color}", lw=1, alpha=0.8, label=label if i == 0 else None)
        axes[0, column].plot(curve[key], curve["loss"], **style)
        axes[1, column].plot([e[key] for e in evals], metric, marker=".", **style)
  for column, xlabel in enumerate(("step", "wall time (s, compile excluded)")):
    for row, ylabel in enumerate(("minibatch train loss", metric_name)):
      axes[row, column].set_xlabel(xlabel)
      axes[row, column].set_ylabel(ylabel)
      axes[row, column].grid(alpha=0.3)
    if log_loss:
      axes[0, column].set_yscale("log")
  axes[0, 0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def finish(results: dict, out: pathlib.Path, with_plot: bool = True,
           log_loss: bool = False) -> None:
  """Summarizes ``results`` (see :func:`summarize`), prints the tables and the diagnostics, and
  writes ``<out>/<task>.json`` (and ``.png``)."""
  runs, settings, task = results["runs"], results["settings"], results["task"]
  summarize(runs, settings)
  print(f"\n{task}: {settings['total_steps']} steps of batch {settings['batch_size']}, seeds "
        f"{settings['seeds']}, {settings['schedule']} schedule, "
        f"{results['environment']['platform']}")
  print(table(runs, settings["metric_name"], settings["baseline"]))
  if settings["targets"]:
    print("\n" + targets_table(runs, settings))
  text = diagnostics_text(runs)
  if text:
    print("\n" + text)
  write_json(results, out / f"{task}.json")
  if with_plot:
    plot(runs, out / f"{task}.png", f"{task} ({settings['batch_size']} per batch)", log_loss,
         settings["metric_name"])
  print(f"\nwrote {out / (task + '.json')}" + (" and .png" if with_plot else ""))


def merge(paths: list, timing: Optional[str] = None) -> dict:
  """The results of several files of one task and settings as one: every label's seeds
  concatenated; the interleaved step times are the ``timing`` file's (a short run of every
  label in one process, e.g. ``--steps 20 --timing-rounds 30``), else the first file's that
  has them for the label.

  Raises:
    ValueError: the files are of different tasks or step counts.
  """
  files = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  if timing is not None:
    timed = json.loads(pathlib.Path(timing).read_text())["runs"]
    for f in files:
      for label, run in f["runs"].items():
        if "interleaved_step_times" in timed.get(label, {}):
          run["interleaved_step_times"] = timed[label]["interleaved_step_times"]
  merged = files[0]
  for other in files[1:]:
    for key in ("total_steps", "batch_size", "schedule"):
      if other["settings"][key] != merged["settings"][key] or other["task"] != merged["task"]:
        raise ValueError(f"cannot merge {merged['task']} results with different {key}.")
    for label, run in other["runs"].items():
      into = merged["runs"].setdefault(label, {**run, "seeds": []})
      into["seeds"] += run["seeds"]
      if "interleaved_step_times" not in into and "interleaved_step_times" in run:
        into["interleaved_step_times"] = run["interleaved_step_times"]
  merged["settings"]["seeds"] = sorted({s["seed"] for r in merged["runs"].values()
                                        for s in r["seeds"]})
  for run in merged["runs"].values():  # JSON nulls back to NaN for the summaries
    for seed in run["seeds"]:
      for e in seed["evals"]:
        for key, value in e.items():
          e[key] = math.nan if value is None else value
  return merged


def main(argv=None) -> None:
  import argparse
  p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                              description="Merge benchmark result files of one task.")
  p.add_argument("files", nargs="+")
  p.add_argument("--timing", help="a result file whose interleaved step times replace the "
                                  "files' (every label timed in one process)")
  p.add_argument("--out", default="benchmarks/out/merged")
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  finish(merge(args.files, args.timing), pathlib.Path(args.out),
         with_plot=not args.no_plot)


if __name__ == "__main__":
  main()
