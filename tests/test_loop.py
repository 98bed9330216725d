"""The pieces `train_and_evaluate` is made of, each on its own, in process, against values worked
out by hand: the epoch record, divergence, checkpoint cadence, epoch keys, the reporter and the
same-run check."""

import contextlib
import io
import json

import ml_collections
import numpy as np
import pytest

from configs import default as default_config
import built
from convnet_jax import train
from convnet_jax.runs import prepare
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import TrainingDiverged
from convnet_jax.errors import UserError


def test_epoch_record_of_one_model_is_sums_over_counts_in_the_documented_order():
  train_totals = {"loss_sum": np.float64(30.0), "correct": np.float64(90.0)}
  test_totals = {"loss_sum": np.float64(5.0), "correct": np.float64(45.0)}
  record = train.epoch_record(2, train.Totals(train_totals, 120), train.Totals(test_totals, 50),
                              np.float64(0.05), np.zeros((), bool),
                              train.EpochTimes(seconds=12.34567, compile_seconds=1.23456))
  assert list(record) == ["epoch", "test_acc", "time", "train_loss", "train_acc", "test_loss",
                          "learning_rate", "compile_time"]
  assert record == {"epoch": 2, "test_acc": 0.9, "time": 12.346, "train_loss": 0.25,
                    "train_acc": 0.75, "test_loss": 0.1, "learning_rate": 0.05,
                    "compile_time": 1.235}


def test_epoch_record_of_replicas_nulls_the_diverged_and_summarises_the_rest():
  train_totals = {"loss_sum": np.array([10.0, np.nan, 20.0]),
                  "correct": np.array([80.0, 0.0, 60.0])}
  test_totals = {"loss_sum": np.array([4.0, np.nan, 6.0]), "correct": np.array([40.0, 0.0, 30.0])}
  diverged = np.array([False, True, False])
  record = train.epoch_record(0, train.Totals(train_totals, 100), train.Totals(test_totals, 50),
                              np.array([0.1, 0.2, 0.3]), diverged, train.EpochTimes(1.0, 2.0),
                              seeds=[7, 8, 9])
  assert record["test_acc"] == [0.8, None, 0.6]
  assert record["train_loss"] == [0.1, None, 0.2]
  assert record["learning_rate"] == [0.1, 0.2, 0.3]  # the schedule's value, diverged or not
  assert record["test_acc_mean"] == pytest.approx(0.7)
  # Sample standard deviation of (0.8, 0.6): |0.8 - 0.6| / sqrt(2).
  assert record["test_acc_std"] == pytest.approx(0.2 / np.sqrt(2))
  assert (record["test_acc_min"], record["test_acc_max"]) == (0.6, 0.8)
  assert record["diverged"] == [1] and record["seeds"] == [7, 8, 9]


def test_check_divergence_keeps_going_while_one_replica_is_finite():
  losses = np.array([[1.0, 0.9, 0.8], [1.0, np.inf, np.nan], [1.0, 1.0, 1.0]])
  diverged = train.check_divergence(losses, np.array([False, False, False]), epoch=3,
                                    num_steps=3, last_checkpoint="after epoch 2",
                                    checkpoint_dir="ckpt")
  assert diverged.tolist() == [False, True, False]


@pytest.mark.parametrize("last_checkpoint, kept", [("at step 3 of epoch 1", "at step 3 of epoch 1"),
                                                   (None, "none yet")])
def test_check_divergence_names_the_global_step_and_the_checkpoint_kept(last_checkpoint, kept):
  losses = np.array([0.7, 0.6, np.nan, np.nan])
  with pytest.raises(TrainingDiverged) as error:
    train.check_divergence(losses, np.zeros((), bool), epoch=2, num_steps=4,
                           last_checkpoint=last_checkpoint, checkpoint_dir="W/checkpoints")
  # Epoch 2 starts at step 2 * 4 = 8; its third step (index 2) is global step 10.
  assert str(error.value) == (f"non-finite loss at step 10 (epoch 2, step 2 of the epoch); the "
                              f"last good checkpoint ({kept}) is kept in W/checkpoints")


def test_all_replicas_diverged_raises():
  losses = np.array([[np.nan, 1.0], [1.0, np.inf]])
  with pytest.raises(TrainingDiverged, match=r"loss in every replica at step 0 \(epoch 0"):
    train.check_divergence(losses, np.array([False, False]), epoch=0, num_steps=2,
                           last_checkpoint=None, checkpoint_dir="c")


def test_initial_divergence_is_read_from_the_last_record():
  assert train.initial_divergence(1, []).shape == ()
  assert train.initial_divergence(4, [{"diverged": []}, {"diverged": [0, 2]}]).tolist() == [
      True, False, True, False]


def test_checkpoints_every_n_epochs_and_after_the_last():
  # Every 2 epochs of 5. Epochs are 0-based: after epochs 2 and 4 trained (indices 1, 3) and
  # after the last (4).
  assert [e for e in range(5) if train.checkpoint_is_due(2, e, 5)] == [1, 3, 4]


def test_evaluations_every_n_epochs_and_after_the_last():
  expected = {1: [0, 1, 2, 3, 4], 2: [1, 3, 4], 0: [4]}  # 0: only after the last
  for every, epochs in expected.items():
    assert [e for e in range(5) if train.evaluation_is_due(every, e, 5)] == epochs


def test_a_negative_evaluation_period_is_named():
  from convnet_jax.runs import validation

  config = default_config.get_config()
  config.operations.eval_every_epochs = -1
  with pytest.raises(UserError, match=r"^config.operations.eval_every_epochs=-1: expected 0 "
                                      r"\(only after the last epoch\) or a positive integer"):
    validation.validate_config(config)


def test_an_epoch_not_evaluated_has_no_test_metrics():
  train_totals = {"loss_sum": np.float64(30.0), "correct": np.float64(90.0)}
  record = train.epoch_record(2, train.Totals(train_totals, 120), None, np.float64(0.05),
                              np.zeros((), bool), train.EpochTimes(12.34567, 1.23456))
  assert record == {"epoch": 2, "time": 12.346, "train_loss": 0.25, "train_acc": 0.75,
                    "learning_rate": 0.05, "compile_time": 1.235}
  replicated = train.epoch_record(
      0, train.Totals({"loss_sum": np.array([30.0, 60.0]), "correct": np.array([90.0, 60.0])},
                      120), None, np.array([0.1, 0.2]), np.zeros(2, bool),
      train.EpochTimes(1.0, 1.0), seeds=[0, 1])
  assert "test_acc" not in replicated and "test_acc_mean" not in replicated
  assert replicated["train_loss"] == [0.25, 0.5] and replicated["seeds"] == [0, 1]


def test_a_run_evaluated_only_at_the_end_trains_the_same(tiny_cifar_dir, tmp_path):
  """Three epochs evaluated only after the last: the same training (train metrics, final test
  accuracy and predictions) as evaluating after each; curves and TensorBoard take the gaps."""
  from convnet_jax.tools import plot

  def run(every, workdir):
    config = default_config.get_config()
    config.data.dir = str(tiny_cifar_dir)
    config.num_epochs, config.batch_size, config.eval.batch_size = 3, 4, 4
    config.operations.eval_every_epochs = every
    config.operations.progress_bar = False
    last = train.train_and_evaluate(config, workdir)
    return last, [json.loads(line) for line in (workdir / "metrics.jsonl").open()]

  every_last, every = run(1, tmp_path / "every")
  only_last, only = run(0, tmp_path / "only")
  assert [("test_acc" in r, "test_loss" in r) for r in only] == [(False, False)] * 2 + [(True,
                                                                                         True)]
  assert all("test_acc" in r for r in every)
  for a, b in zip(every, only):
    assert (a["train_loss"], a["train_acc"]) == (b["train_loss"], b["train_acc"])
  assert only_last["test_acc"] == every_last["test_acc"]
  assert (tmp_path / "only" / "preds").read_text() == (tmp_path / "every" / "preds").read_text()
  figure = plot.plot_curves(plot.read_history(tmp_path / "only"))
  loss_axes = figure.axes[0]
  test_line = [line for line in loss_axes.get_lines() if line.get_label() == "test"][0]
  assert list(test_line.get_xdata()) == [3]
  assert list((tmp_path / "only" / "tensorboard").iterdir())  # the writer took the records


def test_an_auto_dtype_run_keeps_the_dtype_it_computed_in(tiny_cifar_dir, tmp_path, capsys):
  """"auto" is resolved before the run's identity: config.json names the dtype, the start-up
  says why, the caller's config is untouched, and the same command finds the run again."""
  flags = set(open("/proc/cpuinfo").read().split())
  expected = "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"
  config = default_config.get_config()
  config.data.dir = str(tiny_cifar_dir)
  config.num_epochs, config.batch_size, config.eval.batch_size = 1, 4, 4
  config.operations.progress_bar = config.operations.tensorboard = False
  config.model.dtype = "auto"
  first = train.train_and_evaluate(config, tmp_path)
  assert config.model.dtype == "auto"
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["dtype"] == expected
  assert f"dtype: {expected} (auto: " in capsys.readouterr().err
  assert train.train_and_evaluate(config, tmp_path) == first  # finished: found, not retrained


def _quiet_config():
  config = default_config.get_config()
  config.num_epochs = 2
  config.operations.tensorboard = False
  return config


def test_reporter_writes_config_metrics_and_predictions(tmp_path):
  config = _quiet_config()
  files = workdir_lib.RunFiles(tmp_path)
  earlier = {"epoch": 0, "test_acc": 0.5}
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout), built.reporter(config, files) as reporter:
    reporter.start([earlier], {"recorded_fact": {"why": "test"}})
    reporter.epoch({"epoch": 1, "test_acc": 0.75}, step_time_ms=1.0, images_per_second=2.0)
    reporter.finish(np.array([[1, 0, 1], [0, 0, 1]]), {"epoch": 1})
  assert stdout.getvalue() == '{"epoch": 1, "test_acc": 0.75}\n'
  assert [json.loads(line) for line in files.metrics.read_text().splitlines()] == [
      earlier, {"epoch": 1, "test_acc": 0.75}]
  saved = json.loads(files.config.read_text())
  assert saved["optim"]["learning_rate"] == 0.1 and saved["recorded_fact"] == {"why": "test"}
  assert saved["operations"]["tensorboard"] is False
  # A row per test example, a column per replica.
  assert files.predictions.read_text() == "1 0\n0 0\n1 1\n"


def test_a_reporter_that_is_not_the_writer_writes_nothing(tmp_path, capsys):
  files = workdir_lib.RunFiles(tmp_path / "w")
  with built.reporter(_quiet_config(), files, is_writer=False) as reporter:
    reporter.note("hello")
    reporter.start([], {})
    reporter.epoch({"epoch": 0}, step_time_ms=1.0, images_per_second=1.0)
    reporter.finish(np.array([1, 0]), {"epoch": 0})
  assert capsys.readouterr() == ("", "")
  assert not (tmp_path / "w").exists()


def _saved_run(tmp_path, config):
  files = workdir_lib.RunFiles(tmp_path)
  config_values = dict(json.loads(config.to_json_best_effort()),
                       **{workdir_lib.CONV_RECORD_KEY: {"implementation": "im2col"}})
  files.config.write_text(json.dumps(config_values))
  return files


def test_a_run_is_the_config_without_its_operation_groups(tmp_path):
  config = default_config.get_config()
  files = _saved_run(tmp_path, config)
  other_operations = default_config.get_config()
  other_operations.operations.num_devices = 8
  other_operations.operations.tensorboard = False
  other_operations.benchmark.num_steps = 1
  identity = prepare.run_identity(other_operations)
  assert "operations" not in identity and "benchmark" not in identity
  assert workdir_lib.check_workdir(files, identity) == prepare.run_identity(config)


def test_another_run_in_the_workdir_is_refused_naming_the_key(tmp_path):
  files = _saved_run(tmp_path, default_config.get_config())
  other = default_config.get_config()
  other.optim.learning_rate = 0.2
  with pytest.raises(UserError, match=r"holds a run of another config \(optim.learning_rate: 0.2 "
                                      r"here, 0.1 there\)"):
    workdir_lib.check_workdir(files, prepare.run_identity(other))


def test_differences_names_nested_keys_and_stops_after_the_limit():
  here = {"a": 1, "b": {"c": 2, "d": 3}, "e": 4, "f": 5}
  there = {"a": 1, "b": {"c": 9, "d": 8}, "e": 7, "f": 6}
  assert workdir_lib.differences(here, there) == (
      "b.c: 2 here, 9 there, b.d: 3 here, 8 there, e: 4 here, 7 there, ...")


def test_write_atomically_leaves_no_temporary_file(tmp_path):
  path = tmp_path / "out.txt"
  workdir_lib.write_atomically(path, "text\n")
  workdir_lib.write_atomically(tmp_path / "other.txt", lambda p: p.write_text("by function"))
  assert path.read_text() == "text\n"
  assert (tmp_path / "other.txt").read_text() == "by function"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "out.txt"]


def test_the_model_registry_is_what_validation_accepts():
  from convnet_jax import models
  from convnet_jax.runs import validation

  assert validation.MODELS == tuple(models.MODELS) == (
      "seed_convnet", "resnet18", "resnet34", "resnet50", "airbench94")
  config = ml_collections.ConfigDict(dict(default_config.get_config()))
  config.model.name = "resnet101"
  with pytest.raises(UserError, match=r"config.model.name='resnet101': expected one of"):
    validation.validate_config(config)


def test_restore_state_and_history_starts_fresh_or_restores_the_newest_checkpoint(tmp_path):
  from convnet_jax.runs import checkpoints

  files = workdir_lib.RunFiles(tmp_path)
  reporter = built.reporter(_quiet_config(), files, is_writer=False)
  fresh = {"w": np.zeros(3, np.float32)}
  store = checkpoints.CheckpointStore(files.checkpoints, max_to_keep=2)
  try:
    for resuming in (False, True):
      assert prepare.restore_state_and_history(store, fresh, ("fp",), resuming,
                                               reporter) == (fresh, [], None)
    saved = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
    history = [{"epoch": 0}, {"epoch": 1}]
    store.save(2, saved, {"history": history, "config_fingerprint": "fp"})
    state, restored, in_progress = prepare.restore_state_and_history(store, fresh, ("fp",), True,
                                                                     reporter)
    np.testing.assert_array_equal(state["w"], [1.0, 2.0, 3.0])
    assert restored == history and in_progress is None and store.newest_intact == 2
    with pytest.raises(UserError, match="checkpoint of another config"):
      prepare.restore_state_and_history(store, fresh, ("other",), True, reporter)
    # A checkpoint written by an earlier version under its own fingerprint: accepted when it
    # is among those given (the workdir's config.json as that version wrote it).
    assert prepare.restore_state_and_history(store, fresh, ("new", "fp"), True,
                                             reporter)[1] == history
  finally:
    store.close()


def test_choose_convolutions_names_the_key_when_the_path_cannot_run(monkeypatch):
  from convnet_jax.ops import conv

  config = default_config.get_config()
  config.model.conv_implementation = "xla"
  assert prepare.choose_convolutions(config, mesh=None).implementation == "xla"

  def unavailable(*args):
    raise conv.ConvUnavailable("the oneDNN extension is not available: not built")

  monkeypatch.setattr(conv, "choose_conv_implementation", unavailable)
  config.model.conv_implementation = "onednn"
  with pytest.raises(UserError) as error:
    prepare.choose_convolutions(config, mesh=None)
  assert str(error.value) == ("config.model.conv_implementation='onednn': the oneDNN extension "
                              "is not available: not built")


def test_the_newest_intact_checkpoint_skips_a_damaged_newer_one(tmp_path):
  """What a divergence message names as the checkpoint kept: the one restored, not a damaged
  newer one still on disk."""
  from convnet_jax.runs import checkpoints

  directory = tmp_path / "checkpoints"
  store = checkpoints.CheckpointStore(directory, max_to_keep=3)
  for epochs_done in (1, 2):
    store.save(epochs_done, {"w": np.full(4096, epochs_done, np.float32)},
               {"history": [{"epoch": e} for e in range(epochs_done)],
                "config_fingerprint": "fp"})
  assert store.newest_intact == 2
  store.close()
  for path in (directory / "2").rglob("*"):  # zero the second half of every data file
    if path.is_file() and path.stat().st_size > 64:
      data = bytearray(path.read_bytes())
      data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
      path.write_bytes(bytes(data))
  reopened = checkpoints.CheckpointStore(directory, max_to_keep=3)
  try:
    assert reopened.newest_intact is None
    state, record = reopened.restore_latest({"w": np.zeros(4096, np.float32)}, ("fp",))
    assert reopened.newest_intact == 1 and len(record["history"]) == 1
    np.testing.assert_array_equal(state["w"], np.ones(4096, np.float32))
  finally:
    reopened.close()
