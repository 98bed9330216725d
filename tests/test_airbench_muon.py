"""airbench94_muon's network changes and recipe (configs/cifar10_airbench94_muon.py), each
against airbench94_muon.py's own numbers and forms; its optimiser's arithmetic is checked
against a transcription of the script's two optimisers in test_muon.py."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import real_runs
from configs import cifar10_airbench94
from configs import cifar10_airbench94_muon
from conftest import DATA
from convnet_jax import models
from convnet_jax import optim
from convnet_jax.runs import validation
from convnet_jax.runs import prepare
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import UserError
import built

IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)


def _params(config):
  config = config.copy_and_resolve_references()
  config.model.dtype = "float32"  # exact comparisons
  model = models.create_model(config.model, 10, "im2col")
  return model, jax.jit(model.init)(jax.random.key(0), IMAGES)["params"]


def test_the_recipe_is_airbench94_muons():
  config = cifar10_airbench94_muon.get_config()
  validation.validate_config(config)
  # 50,000 / 2,000 = 25 steps an epoch, 8 epochs: 200 steps; the whitening bias for 75.
  steps_per_epoch = 50_000 // config.batch_size
  assert built.budget(config, steps_per_epoch).total_steps == 200
  assert built.budget(config, steps_per_epoch).late_freeze_step == 75
  multiplier = optim.learning_rate_multipliers(config.optim)
  # The SGD groups' learning rates and weight decays, as the script sets them.
  for name, lr in (("head/kernel", 0.67), ("group2/norm1/offset", 0.053),
                   ("whiten/bias", 0.053)):
    assert config.optim.learning_rate * multiplier(name) == pytest.approx(lr)
    assert config.optim.weight_decay / multiplier(name) == pytest.approx(2e-6 * 2000 / lr)
  assert not config.optim.decoupled_hyperparameters and config.lookahead.every_steps == 0
  assert (config.muon.learning_rate, config.muon.momentum, config.muon.nesterov) == (0.24, 0.6,
                                                                                     True)
  assert config.optim.label_smoothing == 0.2 and config.optim.loss_reduction == "sum"


def test_muon_trains_the_group_kernels_and_sgd_the_rest():
  config = cifar10_airbench94_muon.get_config()
  _, params = _params(config)
  labels = optim.muon_labels(tuple(config.muon.parameters), params)
  named = {optim.parameter_name(path): label
           for path, label in jax.tree_util.tree_leaves_with_path(labels)}
  muon = sorted(name for name, label in named.items() if label == "muon")
  assert muon == [f"group{g}/conv{c}/kernel" for g in (1, 2, 3) for c in (1, 2)]
  assert named["whiten/kernel"] == named["whiten/bias"] == named["head/kernel"] == "sgd"
  assert named["group1/norm1/offset"] == "sgd"


def test_the_logits_are_the_head_over_its_width_and_the_head_starts_at_unit_std():
  config = cifar10_airbench94_muon.get_config()
  model, params = _params(config)
  kernel = np.asarray(params["head"]["kernel"], np.float64)
  assert kernel.std(ddof=1) == pytest.approx(1.0, rel=1e-5)  # PyTorch's w.std()
  # The same draw as airbench94's fan-in uniform head, only rescaled.
  legacy = cifar10_airbench94.get_config()
  legacy_model, legacy_params = _params(legacy)
  uniform = np.asarray(legacy_params["head"]["kernel"], np.float64)
  np.testing.assert_allclose(kernel, uniform / uniform.std(ddof=1), rtol=1e-5)
  # Same parameters through both (a random whitening kernel in place of the data's): airbench94's
  # logits are x 1/9, airbench94_muon's x 1/256.
  whiten = dict(legacy_params["whiten"], kernel=jax.random.normal(
      jax.random.key(1), legacy_params["whiten"]["kernel"].shape))
  legacy_params = dict(legacy_params, whiten=whiten)
  ratio = jax.jit(model.apply)({"params": legacy_params}, IMAGES) / jax.jit(
      legacy_model.apply)({"params": legacy_params}, IMAGES)
  np.testing.assert_allclose(np.asarray(ratio), 9 / 256, rtol=1e-4)


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr_multipliers", (("whiten/bias", 0.0),), "expected pairs of a parameter path and a "
                                                "positive multiplier"),
    ("optim.lr_multipliers", ("whiten/bias",), "expected pairs of a parameter path"),
    ("freeze.late_schedule", "cosine", "expected one of ('main', 'linear_to_zero')"),
    ("muon.momentum", 1.0, "expected a number in [0, 1)"),
    ("muon.newton_schulz_steps", 0, "expected a positive integer"),
    ("muon.parameters", ("",), "expected a tuple of parameter paths"),
    ("model.airbench.output_scale", 0, "expected a positive number"),
    # hiverge's (configs/cifar10_speedrun.py):
    ("augment.brightness", 1.0, "expected a number in [0, 1)"),
    ("augment.contrast", -0.1, "expected a number in [0, 1)"),
    ("model.airbench.activation", "relu", "expected one of ('gelu', 'silu')"),
    ("model.airbench.whitening_examples", 0, "expected a positive number of training images"),
    ("freeze.late_epochs", -0.5, "expected a non-negative number of epochs"),
    ("muon.newton_schulz_coefficients", (3.4, -4.7), "expected three numbers (a, b, c)"),
    ("muon.weight_decay", -1.0, "expected a non-negative number"),
    ("muon.normalize_period", 0, "expected a positive integer number of steps"),
    ("muon.normalize_period_growth", -1, "expected a non-negative integer number of steps"),
])
def test_bad_muon_recipe_keys_are_named(key, value, message):
  # (ml_collections itself refuses values of another type, such as 1 for a bool key.)
  config = cifar10_airbench94_muon.get_config()
  error = built.validation_error(config, key, value)
  assert error.startswith(f"config.{key}=") and message in error


def test_nesterov_muon_without_momentum_is_refused():
  config = cifar10_airbench94_muon.get_config()
  config.muon.momentum = 0.0
  with pytest.raises(UserError, match=r"^config.muon.nesterov=True: expected False when "
                                      r"config.muon.momentum is 0"):
    validation.validate_config(config)


@pytest.mark.parametrize("key, value, message", [
    ("muon.parameters", ("group4",), "'group4' names none"),
    ("muon.parameters", ("head",), "4-D convolution kernels under them; 'head' has none"),
    ("muon.parameters", ("whiten",), "not also frozen; 'whiten/kernel' is"),
    ("optim.lr_multipliers", (("whitening/bias", 0.1),), "'whitening/bias' names none"),
])
def test_muon_and_group_paths_must_name_the_right_parameters(key, value, message):
  config = cifar10_airbench94_muon.get_config()
  _, params = _params(config)
  validation.check_parameter_paths(config, params)
  built.with_values(config, {key: value})
  with pytest.raises(UserError, match=f"config.{key}=") as error:
    validation.check_parameter_paths(config, params)
  assert message in str(error.value)


def test_a_workdir_saved_before_the_muon_keys_existed_still_resumes(tmp_path):
  # airbench94's config.json as the package wrote it before the groups, less the keys added
  # since (by their names then), as a workdir from before those keys holds it.
  saved = json.loads((DATA / "flat_config_airbench94.json").read_text())
  for key in ("muon", "lr_multipliers", "late_freeze_schedule", "airbench_output_scale",
              "airbench_head_unit_std", "airbench_activation", "airbench_whitening_examples",
              "augment_brightness", "augment_contrast"):
    del saved[key]
  files = workdir_lib.RunFiles(tmp_path)
  files.config.write_text(json.dumps(saved))
  config = cifar10_airbench94.get_config()
  assert workdir_lib.check_workdir(files, prepare.run_identity(config)) == (
      workdir_lib.identity(saved))
  # The new keys at other values are another computation: refused, naming the key.
  config.muon.parameters = ("group1",)
  with pytest.raises(UserError, match=r"muon.parameters: \['group1'\] here, \[\] there"):
    workdir_lib.check_workdir(files, prepare.run_identity(config))


def test_added_keys_hold_the_defaults_values():
  """A config.json from before the keys existed ran with what the defaults still are."""
  from configs import default

  current = workdir_lib.flatten(json.loads(default.get_config().to_json_best_effort()))
  for key, value in workdir_lib.ADDED_KEYS.items():
    if key == "model.batch_norm_implementation":
      # The one exception: runs before it computed BatchNorm in XLA, which "auto" now leaves
      # for oneDNN's beside oneDNN's convolutions (the same function; not part of the identity).
      assert (value, current[key]) == ("jax", "auto")
      continue
    assert current[key] == value, key
  assert math.isclose(workdir_lib.ADDED_KEYS["model.airbench.output_scale"], 1 / 9)


@pytest.mark.slow
def test_the_muon_recipe_learns_on_real_cifar10(cifar10_dir, tmp_path):
  """Two epochs of 4 steps of the recipe at batch 500 on 2,000 real training images."""
  config = cifar10_airbench94_muon.get_config()
  config.freeze.late_epochs = 1
  last, records = real_runs.short_real_run(config, cifar10_dir, tmp_path, train_examples=2000,
                                           batch_size=500, num_epochs=2)
  assert [r["epoch"] for r in records] == [0, 1]
  assert records[1]["train_loss"] < records[0]["train_loss"]
  assert records[1]["test_acc"] > 0.25  # chance is 0.1
  assert last == records[1] and 0.25 < last["tta_test_acc"] <= 1
