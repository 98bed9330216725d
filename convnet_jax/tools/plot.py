"""Training curves: `python -m convnet_jax.plot WORKDIR [--output FILE]`.

Reads WORKDIR/metrics.jsonl (one JSON record per epoch, as `train.train_and_evaluate` writes it)
and draws train and test loss and error (1 - accuracy) against the number of epochs trained, with
a dotted vertical line at each drop of the learning rate. Writes a PNG (default
WORKDIR/curves.png). Uses matplotlib's object-oriented API with the Agg canvas, so it needs no
display and leaves pyplot's global state alone (notebooks can show the returned figure).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from convnet_jax.errors import UserError

# A learning rate counts as dropped when it falls to at most this fraction of the previous
# epoch's after being flat: step decays (x0.1) qualify, while linear and cosine decays, which
# fall every epoch, never are flat before falling.
DROP_RATIO = 0.5
REQUIRED_KEYS = ("epoch", "train_loss", "train_acc")
# Only in the epochs that were evaluated (`operations.eval_every_epochs`).
TEST_KEYS = ("test_loss", "test_acc")


def read_history(workdir: str | Path) -> list[dict]:
  """The per-epoch records of WORKDIR/metrics.jsonl; `UserError` if it is missing or empty."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise UserError(f"{path}: file not found (expected the metrics.jsonl of a training run)")
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  if not lines:
    raise UserError(f"{path}: empty (the run has not finished an epoch yet)")
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise UserError(f"{path}: line {number} is not JSON ({error.msg})") from error
    missing = [key for key in REQUIRED_KEYS if key not in record]
    missing += [key for key in TEST_KEYS if key not in record] if any(
        key in record for key in TEST_KEYS) else []
    if missing:
      raise UserError(f"{path}: line {number} lacks {', '.join(missing)}")
    records.append(record)
  return records


def learning_rate_drops(records: Sequence[dict]) -> list[int]:
  """Epochs whose learning rate (at the epoch's start) is a step down from the previous epoch's:
  at most `DROP_RATIO` times it, after a flat stretch (or at epoch 1)."""
  rates = [record["learning_rate"] for record in records]
  drops = []
  for epoch in range(1, len(rates)):
    flat_before = epoch == 1 or rates[epoch - 1] >= rates[epoch - 2]
    if flat_before and rates[epoch] <= DROP_RATIO * rates[epoch - 1]:
      drops.append(records[epoch]["epoch"])
  return drops


def _series(records: Sequence[dict], key: str, transform=lambda v: v):
  """Per epoch: the value of `key`, or for a replicated run (a list per epoch) the mean, min and
  max over the replicas that have not diverged (null)."""
  values = [record[key] for record in records]
  if not isinstance(values[0], list):
    return [transform(v) for v in values], None, None
  kept = [[transform(v) for v in epoch if v is not None] or [float("nan")] for epoch in values]
  return ([sum(epoch) / len(epoch) for epoch in kept], [min(epoch) for epoch in kept],
          [max(epoch) for epoch in kept])


def plot_curves(records: Sequence[dict], title: str = "") -> Figure:
  """A figure with two panels, loss and error (1 - accuracy), train and test, against epochs
  trained (epoch e's record is plotted at e + 1), and a vertical line where the lr drops. For a
  replicated run: the replicas' mean, with their min-max range shaded. Epochs without test
  metrics (not evaluated) are left out of the test curves."""
  figure = Figure(figsize=(10, 4), layout="constrained")
  FigureCanvasAgg(figure)
  loss_axes, error_axes = figure.subplots(1, 2)
  for split, style in (("train", "-"), ("test", "--")):
    # The test curves join the evaluated epochs only (`operations.eval_every_epochs`).
    split_records = [record for record in records if f"{split}_loss" in record]
    if not split_records:
      continue
    epochs_trained = [record["epoch"] + 1 for record in split_records]
    for axes, key, transform in ((loss_axes, f"{split}_loss", lambda v: v),
                                 (error_axes, f"{split}_acc", lambda v: 1 - v)):
      middle, low, high = _series(split_records, key, transform)
      line, = axes.plot(epochs_trained, middle, style, marker=".",
                        label=split if low is None else f"{split} (replica mean, min-max)")
      if low is not None:
        axes.fill_between(epochs_trained, low, high, color=line.get_color(), alpha=0.2)
  drops = []
  if "learning_rate" in records[0]:
    # Replicas share the schedule's shape, so the first replica's rates show the drops.
    drops = learning_rate_drops([dict(r, learning_rate=r["learning_rate"][0]) if isinstance(
        r["learning_rate"], list) else r for r in records])
  for axes, name in ((loss_axes, "loss"), (error_axes, "error (1 - accuracy)")):
    for index, epoch in enumerate(drops):
      # The lr drops at the start of epoch `epoch`, i.e. after `epoch` epochs of training.
      axes.axvline(epoch, color="grey", linestyle=":", label="lr drop" if index == 0 else None)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epochs trained")
    axes.set_ylabel(name)
    axes.grid(alpha=0.3)
    axes.legend()
  if title:
    figure.suptitle(title)
  return figure


def save_curves(workdir: str | Path, output: str | Path | None = None) -> Path:
  """Plots WORKDIR/metrics.jsonl to `output` (default WORKDIR/curves.png); returns the path."""
  records = read_history(workdir)
  output = Path(output) if output else Path(workdir) / "curves.png"
  plot_curves(records, title=str(workdir)).savefig(output, format="png", dpi=100)
  return output


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m convnet_jax.plot", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("workdir", help="a training run's folder, holding metrics.jsonl")
  parser.add_argument("--output", help="the PNG to write (default WORKDIR/curves.png)")
  args = parser.parse_args(argv)
  try:
    output = save_curves(args.workdir, args.output)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
