"""Replicas: several models trained together in one compiled program (`vmap` over parameters,
optimiser states and data order), for multi-seed statistics and dense sweeps.

A replicated run stacks every model along a leading axis; its metrics are one value per replica,
null from the epoch a replica's loss stops being finite (it is then *diverged*, and the others go
on). A run of one model is not replicated: its metrics are plain numbers.
"""

from __future__ import annotations

import numpy as np


def replica_settings(replicas, seed: int, learning_rate: float, momentum: float
                     ) -> dict[str, list]:
  """Seed, peak learning rate and momentum of each of the `replicas.count` models (the config's
  `replicas` group): replica i has `replicas.seeds[i]` (default `seed + i`),
  `replicas.learning_rates[i]` (default `learning_rate`) and `replicas.momenta[i]` (default
  `momentum`). One model: the values given."""
  count = replicas.count
  return {
      "seed": list(replicas.seeds) or [seed + i for i in range(count)],
      "learning_rate": list(replicas.learning_rates) or [learning_rate] * count,
      "momentum": list(replicas.momenta) or [momentum] * count,
  }


def first_nonfinite_steps(step_losses) -> np.ndarray:
  """Index of the first non-finite step loss per row of `step_losses` (-1 where all are finite);
  one row per replica, or a 0-d result for a single model."""
  bad = ~np.isfinite(np.asarray(step_losses))
  return np.where(bad.any(axis=-1), bad.argmax(axis=-1), -1)


def metric_values(values: np.ndarray, diverged: np.ndarray):
  """A metric as JSON: a float for one model, a list for replicas with null for diverged ones."""
  if values.ndim == 0:
    return float(values)
  return [None if bad else float(v) for v, bad in zip(values, diverged)]


def replica_summary(test_accuracies: list) -> dict[str, float]:
  """Mean, sample standard deviation (n - 1), min and max of the replicas' test accuracies,
  leaving out diverged replicas (None)."""
  values = np.asarray([v for v in test_accuracies if v is not None], np.float64)
  if values.size == 0:
    return {}
  return {"test_acc_mean": float(values.mean()),
          "test_acc_std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
          "test_acc_min": float(values.min()), "test_acc_max": float(values.max())}


def summary_line(record: dict) -> str:
  """The closing line of a replicated run, from its last record."""
  seeds = record["seeds"]
  return (f"final test accuracy over {len(seeds) - len(record['diverged'])} replicas (seeds "
          f"{seeds}): mean {record['test_acc_mean']:.4f}, std {record['test_acc_std']:.4f}, min "
          f"{record['test_acc_min']:.4f}, max {record['test_acc_max']:.4f}")
