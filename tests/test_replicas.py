"""N models in one compiled program (vmap): each replica against an independent single run of
its seed, learning rate and momentum; divergence of one replica; the statistics; resuming; the
validation of the replica keys."""

import json
import math
import shutil

import numpy as np
import pytest

from configs import default as default_config
import built
from configs import default_10_seeds
from configs import smoke
from convnet_jax import train
from convnet_jax.parallel import replicas
from convnet_jax.runs import validation
from convnet_jax.errors import UserError

# One worker runs this file's tests, so its module fixtures are computed once (pytest-xdist).
pytestmark = pytest.mark.xdist_group("replicas")

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "learning_rate")
# Replica 2's peak learning rate makes its loss overflow within the first few steps.
REPLICAS = {"replicas.learning_rates": (0.1, 0.05, 1e4), "replicas.momenta": (0.9, 0.5, 0.9)}


def _config(cifar10_dir, overrides=None):
  config = smoke.get_config()
  config.data.dir = str(cifar10_dir)
  config.num_epochs = 2
  config.operations.tensorboard = False
  config.operations.progress_bar = False
  return built.with_values(config, overrides or {})


def _read(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for record in records:
    record.pop("time")
    record.pop("compile_time")
  predictions = np.loadtxt(workdir / "preds", dtype=int, ndmin=2)
  return records, predictions


@pytest.fixture(scope="module")
def replicated_run(cifar10_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("replicas") / "run"
  train.train_and_evaluate(_config(cifar10_dir, {"replicas.count": 3, **REPLICAS}), workdir)
  return workdir, *_read(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("replica", [0, 1])
def test_each_replica_matches_a_single_run_of_its_seed_and_hyperparameters(
    replica, replicated_run, cifar10_dir, tmp_path):
  _, records, predictions = replicated_run
  single = _config(cifar10_dir, {
      "seed": replica, "optim.learning_rate": REPLICAS["replicas.learning_rates"][replica],
      "optim.momentum": REPLICAS["replicas.momenta"][replica]})
  train.train_and_evaluate(single, tmp_path / "single")
  single_records, single_predictions = _read(tmp_path / "single")
  assert len(records) == len(single_records) == 2
  for record, single_record in zip(records, single_records):
    for key in METRICS:
      assert record[key][replica] == pytest.approx(single_record[key], abs=1e-5), key
  np.testing.assert_array_equal(predictions[:, replica], single_predictions[:, 0])


@pytest.mark.slow
def test_a_diverged_replica_is_null_and_leaves_the_others_alone(replicated_run):
  _, records, predictions = replicated_run
  last = records[-1]
  assert last["diverged"] == [2] and last["seeds"] == [0, 1, 2]
  for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
    assert last[key][2] is None and None not in last[key][:2]
  # Its learning rate is still reported: the linear schedule's value at epoch 1 of 2.
  assert last["learning_rate"][2] == pytest.approx(1e4 * 0.5)
  # Mean, sample std (n - 1), min and max of the two replicas that did not diverge.
  a, b = last["test_acc"][:2]
  assert last["test_acc_mean"] == pytest.approx((a + b) / 2)
  assert last["test_acc_std"] == pytest.approx(abs(a - b) / math.sqrt(2))
  assert (last["test_acc_min"], last["test_acc_max"]) == (min(a, b), max(a, b))
  assert predictions.shape == (100, 3)  # one column per replica


def test_replica_summary_by_hand():
  summary = replicas.replica_summary([0.96, None, 0.95, 0.97])
  assert summary["test_acc_mean"] == pytest.approx(0.96)
  assert summary["test_acc_std"] == pytest.approx(math.sqrt((0.0 + 0.0001 + 0.0001) / 2))
  assert summary["test_acc_min"] == 0.95 and summary["test_acc_max"] == 0.97
  assert replicas.replica_summary([0.9])["test_acc_std"] == 0.0


@pytest.mark.slow
def test_replicated_run_resumes_from_its_checkpoint(replicated_run, cifar10_dir, tmp_path):
  workdir, records, predictions = replicated_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  # As if killed during epoch 1: the checkpoint after it (smoke: 4 steps an epoch) is gone.
  shutil.rmtree(copy / "checkpoints" / "8")
  (copy / "preds").unlink()
  train.train_and_evaluate(_config(cifar10_dir, {"replicas.count": 3, **REPLICAS}), copy)
  resumed_records, resumed_predictions = _read(copy)
  assert resumed_records == records
  np.testing.assert_array_equal(resumed_predictions, predictions)


def _settings(config):
  return replicas.replica_settings(config.replicas, config.seed, config.optim.learning_rate,
                                   config.optim.momentum)


def test_replica_settings_default_to_consecutive_seeds_and_the_config_values():
  config = default_config.get_config()
  config.replicas.count, config.seed = 3, 5
  assert _settings(config) == {
      "seed": [5, 6, 7], "learning_rate": [0.1] * 3, "momentum": [0.9] * 3}
  ten = default_10_seeds.get_config()
  assert _settings(ten)["seed"] == list(range(10))
  # Everything else is the default run.
  ten.replicas.count = 1
  assert ten == default_config.get_config()


@pytest.mark.parametrize("overrides, message", [
    ({"replicas.count": 0}, "config.replicas.count=0: expected a positive integer"),
    ({"replicas.count": 3, "replicas.learning_rates": (0.1,)},
     "config.replicas.learning_rates=(0.1,): expected () or a tuple of replicas.count=3 values"),
    ({"replicas.count": 2, "replicas.momenta": (0.9, 1.0)},
     "config.replicas.momenta=(0.9, 1.0): expected numbers in [0, 1)"),
    ({"replicas.count": 2, "replicas.seeds": (0, 1.5)},
     "config.replicas.seeds=(0, 1.5): expected integer seeds"),
    ({"replicas.count": 2, "replicas.momenta": (0.9, 0.0), "optim.nesterov": True},
     "config.optim.nesterov=True: expected False when a replica's momentum is 0"),
    ({"operations.num_devices": -1},
     "config.operations.num_devices=-1: expected 0 (all devices) or a positive"),
])
def test_bad_replica_and_device_keys_are_named(overrides, message):
  config = default_config.get_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(UserError) as error:
    validation.validate_config(config)
  assert message in str(error.value)


def test_device_checks_name_the_key():
  config = default_config.get_config()
  config.operations.num_devices = 4
  with pytest.raises(UserError,
                     match=r"config.operations.num_devices=4: expected at most the 2 devices"):
    validation.check_devices(config, device_count=2)
  config.operations.num_devices, config.batch_size = 3, 128
  with pytest.raises(UserError, match=r"config.batch_size=128: expected a multiple of the 3"):
    validation.check_devices(config, device_count=4)
  config.operations.num_devices = 0  # all 4: 128 splits evenly
  validation.check_devices(config, device_count=4)
