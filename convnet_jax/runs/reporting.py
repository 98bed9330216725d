"""Everything a run shows and keeps besides checkpoints, behind one object, `Reporter`.

stdout gets one JSON line per epoch and nothing else; stderr the notes (convolution path,
compile time, resumption, the shape trace), and in a terminal a progress bar over the run's
steps; the workdir config.json, metrics.jsonl, preds and tensorboard/. In a multi-process run
only process 0 writes: the others get a reporter that does nothing, so the training loop never
asks.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from typing import Any, Sequence

import jax
import numpy as np

from convnet_jax import models
from convnet_jax.budget import StepBudget
from convnet_jax.parallel import replicas
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import WriteFailed

# The scalars of each epoch's TensorBoard page.
TENSORBOARD_SCALARS = ("train_loss", "train_acc", "test_loss", "test_acc", "learning_rate",
                       "step_time_ms", "images_per_second")


class Reporter:
  """Writes a run's outputs (see the module docstring); a no-op unless `is_writer`."""

  def __init__(self, files: workdir_lib.RunFiles, config_values: dict[str, Any], operations,
               is_writer: bool = True):
    """`config_values`: the run's config as JSON data, for config.json; `operations`: the
    config's `operations` group (TensorBoard, the progress bar)."""
    self.files = files
    self.config_values = config_values
    self.operations = operations
    self.is_writer = is_writer
    self._progress = None
    self._progress_range = (0, 0)
    self._epochs = 0
    self._tensorboard = None
    self._tensorboard_failure: OSError | None = None
    self._thread_hook = threading.excepthook

  def note(self, message: str) -> None:
    """One line on stderr."""
    if self.is_writer:
      if self._progress is not None and not self._progress.disable:
        self._progress.clear()  # the line goes above the bar, not through it
      print(message, file=sys.stderr, flush=True)

  def start(self, history: Sequence[dict], recorded: dict[str, Any],
            budget: StepBudget | None = None, steps_done: int = 0) -> None:
    """Writes config.json (the config plus the `recorded` facts about this run) and
    metrics.jsonl (the epochs restored from a checkpoint: later ones are computed again). Opens
    TensorBoard and the progress bar over the steps of `budget`, `steps_done` of them done."""
    if not self.is_writer:
      return
    with writing(self.files.metrics):
      workdir_lib.write_atomically(self.files.metrics,
                                   "".join(json.dumps(r) + "\n" for r in history))
    config_values = dict(self.config_values, **recorded)
    with writing(self.files.config):
      workdir_lib.write_atomically(self.files.config,
                                   json.dumps(config_values, indent=2) + "\n")
    if self.operations.tensorboard:
      import tensorboardX  # imported here: writes event files without TensorFlow

      with writing(self.files.tensorboard):
        # An unbounded queue (0): once a write fails, tensorboardX's writer thread is gone, and a
        # full queue of 10 would block the run's next add_scalar forever instead of letting it
        # report the failure (seen on a loaded machine, and sure with replicas' many scalars).
        self._tensorboard = tensorboardX.SummaryWriter(str(self.files.tensorboard),
                                                       max_queue=0)
      self._thread_hook = threading.excepthook
      threading.excepthook = self._tensorboard_thread_failed
    if budget is not None:
      self._progress_range = (budget.total_steps, steps_done)
      self._epochs = budget.epochs_run

  def steps(self, num_steps: int, epoch: int, images_per_second: float) -> None:
    """Moves the progress bar by `num_steps` steps of epoch `epoch`."""
    if not self.is_writer:
      return
    if self._progress is None:  # drawn from the first call on, so compiling is not in its rate
      import tqdm  # imported here: only interactive runs draw a bar

      total, initial = self._progress_range
      self._progress = tqdm.tqdm(
          total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
          disable=not (self.operations.progress_bar and sys.stderr.isatty()))
    self._progress.set_description(f"epoch {epoch + 1}/{self._epochs}", refresh=False)
    self._progress.set_postfix_str(f"{images_per_second:,.0f} img/s", refresh=False)
    self._progress.update(num_steps)

  def epoch(self, record: dict, step_time_ms: float, images_per_second: float) -> None:
    """Reports a finished epoch: its JSON line on stdout and in metrics.jsonl, its scalars in
    TensorBoard (with the step time and throughput, which are not in the record, as they differ
    between identical runs)."""
    if not self.is_writer:
      return
    line = json.dumps(record)
    if self._progress is not None and not self._progress.disable:
      self._progress.clear()  # the JSON line goes above the bar, not through it
    print(line, flush=True)
    with writing(self.files.metrics), self.files.metrics.open("a") as metrics_file:
      metrics_file.write(line + "\n")
    if self._tensorboard is not None:
      with writing(self.files.tensorboard):
        write_tensorboard(self._tensorboard, dict(record, step_time_ms=step_time_ms,
                                                  images_per_second=images_per_second),
                          record["epoch"] + 1)
        if self._tensorboard_failure is not None:
          raise self._tensorboard_failure

  def finish(self, predictions: np.ndarray, last_record: dict) -> None:
    """Writes preds (one line per test example, a column per replica) and, for replicas, the
    closing summary line."""
    if not self.is_writer:
      return
    num_test = predictions.shape[-1]
    rows = np.asarray(predictions).reshape(-1, num_test).T
    with writing(self.files.predictions):
      workdir_lib.write_atomically(self.files.predictions,
                                   "".join(" ".join(map(str, row)) + "\n" for row in rows))
    if "seeds" in last_record:
      self.note(replicas.summary_line(last_record))

  def close(self) -> None:
    if self._progress is not None:
      self._progress.close()
    if self._tensorboard is not None:
      try:
        self._tensorboard.close()
      except OSError:  # its last events could not be flushed: the run's own line says why
        pass
      self._tensorboard = None
      threading.excepthook = self._thread_hook

  def _tensorboard_thread_failed(self, args) -> None:
    """tensorboardX writes its events from a thread of its own: a write that fails there (a
    full disk) is kept for the next epoch to report (`WriteFailed`) instead of the thread's
    traceback; any other thread's error goes to the hook as before."""
    if (issubclass(args.exc_type, OSError)
        and type(args.thread).__module__.startswith("tensorboardX")):
      self._tensorboard_failure = args.exc_value
    else:
      self._thread_hook(args)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


@contextlib.contextmanager
def writing(path):
  """Turns an OSError from writing `path` (a full disk, say) into `WriteFailed` naming it."""
  try:
    yield
  except OSError as error:
    raise WriteFailed(str(path), error) from None


def finished_run_line(record: dict, workdir) -> str:
  """The stderr line of a run started again after it finished: its epochs, final test accuracy
  (with test-time augmentation where it had it) and where its files are."""
  def accuracy(value):
    if isinstance(value, list):  # replicas: the mean over those that did not diverge
      values = [v for v in value if v is not None]
      return (f"mean {np.mean(values):.4f} over {len(values)} replicas" if values
              else "none (every replica diverged)")
    return f"{value:.4f}"

  text = accuracy(record["test_acc"])
  if "tta_test_acc" in record:
    text += f" ({accuracy(record['tta_test_acc'])} with test-time augmentation)"
  return (f"run complete: {record['epoch'] + 1} epochs, final test accuracy {text}; its files "
          f"are in {workdir} (metrics.jsonl, preds, checkpoints/); nothing was run again")


def write_tensorboard(writer, record: dict, step: int) -> None:
  """One epoch's scalars (the test ones only in evaluated epochs); for replicas, one curve per
  replica and the test accuracy summary."""
  for name in TENSORBOARD_SCALARS:
    if name not in record:
      continue
    value = record[name]
    if not isinstance(value, list):
      writer.add_scalar(name, value, step)
      continue
    for replica, replica_value in enumerate(value):
      if replica_value is not None:
        writer.add_scalar(f"{name}/replica_{replica}", replica_value, step)
  if isinstance(record.get("test_acc"), list):
    for name, value in replicas.replica_summary(record["test_acc"]).items():
      writer.add_scalar(name, value, step)
  writer.flush()


def shape_trace(model, params, images: jax.Array, labels: jax.Array) -> list[str]:
  """Reference-style trace of a training step's shapes: input, target, each layer, pooled
  features (named by the model's `global_pool_name`) and output."""
  lines = [f"input: {tuple(images.shape)}", f"target: {tuple(labels.shape)}"]
  layers = models.describe_shapes(model, params, images)
  for line in layers:
    if line.startswith("head "):
      pooled = line.split(": ", 1)[1].split(" -> ")[0]
      lines.append(f"{model.global_pool_name}: {pooled}")
    lines.append(line)
  output = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, images)
  lines.append(f"output: {tuple(output.shape)}")
  return lines


def compile_time_line(seconds: float, cached: str | None) -> str:
  """The start-up line on compiling: "compile time: 2.16 s (4 of 4 programs from the
  compilation cache)"."""
  return f"compile time: {seconds:.2f} s" + (f" ({cached})" if cached else "")
