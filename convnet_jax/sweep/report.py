"""A sweep's reports, rewritten after every trial: DIR/trials.md and DIR/trials.csv (the trials,
best first) and DIR/objective.png (the objective against each swept value)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.sweep import config as sweep_config
from convnet_jax.sweep import study as sweep_study


def columns(param_names, objective: str) -> list[str]:
  """The table's columns: trial number, state, each swept value, the objective, two more final
  metrics, the trial's wall time, its workdir (relative to DIR) and its error if it failed."""
  extra = [key for key in ("test_acc", "train_loss") if key != objective]
  return ["trial", "state", *param_names, objective, *extra, "time_s", "workdir", "error"]


def trial_rows(study: optuna.Study, objective: str, maximize: bool, param_names) -> list[dict]:
  """One dict per trial (an interrupted trial only through its re-run, a surplus one not at
  all) with the `columns` and its host and path, best first: completed trials by the
  objective, then running and queued ones, then failed ones."""
  trials = study.get_trials(deepcopy=False)
  retried = sweep_study.retried_numbers(trials)
  rows = []
  for trial in trials:
    if trial.number in retried or sweep_study.is_surplus(trial):
      continue
    metrics = trial.user_attrs.get("metrics", {})
    # Besides the columns, where it ran: host and absolute path.
    row = dict.fromkeys(columns(param_names, objective) + ["host", "path"], "")
    row.update({"trial": trial.number, "state": trial.state.name,
                **{key: trial.user_attrs.get(key, "") for key in ("workdir", "error", "host",
                                                                  "path")}})
    row.update({name: trial.params[name] for name in param_names if name in trial.params})
    row.update({key: metrics[key] for key in sweep_config.METRIC_KEYS
                if key in row and key in metrics})
    if trial.state == TrialState.COMPLETE:
      row[objective] = trial.value
    if trial.state == TrialState.FAIL and not row["error"]:
      row["error"] = "stopped without an error (its process was killed) and not re-run"
    if trial.datetime_start and trial.datetime_complete:
      row["time_s"] = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)
    rows.append(row)

  def order(row):
    if row["state"] == "COMPLETE":
      return (0, -row[objective] if maximize else row[objective], row["trial"])
    return (1 if row["state"] in ("RUNNING", "WAITING") else 2, 0, row["trial"])

  return sorted(rows, key=order)


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(rows: list[dict], header: list[str]) -> str:
  """A GitHub markdown table of the rows (numbers to 4 significant digits)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(row[key]) for key in header) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def csv_table(rows: list[dict], header: list[str]) -> str:
  """The rows as CSV, numbers at full precision."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n", extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  return buffer.getvalue()


def plot_objective(rows: list[dict], space: Mapping[str, BaseDistribution],
                   objective: str) -> Figure:
  """One panel per swept parameter: the objective of each completed trial against its value (log
  x axis for log-scale parameters), the best trial as a star and failed trials as crosses on the
  x axis."""
  complete = [row for row in rows if row["state"] == "COMPLETE"]
  failed = [row for row in rows if row["state"] == "FAIL"]
  figure = Figure(figsize=(4.5 * len(space), 3.8), layout="constrained")
  FigureCanvasAgg(figure)
  for axes, (name, distribution) in zip(figure.subplots(1, len(space), squeeze=False)[0],
                                        space.items()):
    axes.plot([row[name] for row in complete], [row[objective] for row in complete], "o",
              label="trial")
    if complete:  # rows are sorted best first
      axes.plot(complete[0][name], complete[0][objective], "*", markersize=16, color="C3",
                label=f"best (trial {complete[0]['trial']})")
    points = [row[name] for row in failed if row[name] != ""]
    if points:
      # At the bottom edge: failed trials have no objective.
      axes.plot(points, [0] * len(points), "x", color="grey", clip_on=False,
                transform=axes.get_xaxis_transform(), label="failed")
    if getattr(distribution, "log", False):
      axes.set_xscale("log")
    axes.set_xlabel(name)
    axes.set_ylabel(objective)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
  return figure


def write_reports(study: optuna.Study, config, workdir: Path,
                  space: Mapping[str, BaseDistribution]) -> list[dict]:
  """Writes DIR/trials.md, DIR/trials.csv and DIR/objective.png; returns the rows."""
  header = columns(list(space), config.objective)
  rows = trial_rows(study, config.objective, sweep_config.direction(config) == "maximize",
                    list(space))
  workdir_lib.write_atomically(workdir / "trials.md", markdown_table(rows, header))
  workdir_lib.write_atomically(workdir / "trials.csv", csv_table(rows, header))
  figure = plot_objective(rows, space, config.objective)
  figure.suptitle(f"{config.study_name}: {config.objective} of {len(rows)} trials")
  workdir_lib.write_atomically(workdir / "objective.png",
                    lambda p: figure.savefig(p, format="png", dpi=100))
  return rows
