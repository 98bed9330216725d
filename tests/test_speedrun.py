"""hiverge/cifar10-speedrun's recipe (configs/cifar10_speedrun.py) and the knobs it added, each
against cifar10_speedrun.py's own numbers and forms: SiLU, the whitening from 960 images, the
colour jitter, a fractional whitening-bias epoch, and saved configs from before the knobs.
Its Muon is checked against a transcription of the script's `Muon.step` in test_muon.py."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import real_runs
import whole_epochs
from configs import cifar10_airbench94_muon
from configs import cifar10_speedrun
from configs import default as default_config
from conftest import DATA
from convnet_jax import models
from convnet_jax import optim
from convnet_jax import steps
from convnet_jax.data import input_pipeline
from convnet_jax.models import airbench
from convnet_jax.runs import validation
from convnet_jax.runs import prepare
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.budget import StepBudget
from convnet_jax.errors import UserError


def test_the_recipe_is_hiverges():
  config = cifar10_speedrun.get_config()
  validation.validate_config(config)
  # 50,000 // 1,536 = 32 steps an epoch (the short batch dropped); ceil(7.59 x 32) = 243
  # steps, the whitening bias for ceil(0.19 x 32) = 7 of them.
  budget = prepare.step_budget(config, 50_000)
  assert (budget.steps_per_epoch, budget.total_steps, budget.late_freeze_step) == (32, 243, 7)
  assert budget.epochs_run == 8 and budget.epoch_steps(7) == 19
  wd = 1.0418e-6 * 1536
  multiplier = optim.learning_rate_multipliers(config.optim)
  for name, lr in (("head/kernel", 0.5415), ("group3/norm2/offset", 0.0573),
                   ("whiten/bias", 0.0573)):
    assert config.optim.learning_rate * multiplier(name) == pytest.approx(lr)
    assert config.optim.weight_decay / multiplier(name) == pytest.approx(wd / lr)
  assert (config.optim.momentum, config.optim.nesterov, config.optim.label_smoothing) == (
      0.825, True, 0.09)
  muon = config.muon
  assert (muon.learning_rate, muon.momentum, muon.nesterov) == (0.205, 0.655, True)
  assert tuple(muon.newton_schulz_coefficients) == (3.4576, -4.7391, 2.0843)
  assert muon.weight_decay == pytest.approx(wd)
  assert (muon.normalize_period, muon.normalize_period_growth) == (2, 15)
  assert (config.augment.translate, config.augment.padding, config.augment.flip) == (
      2, "reflect", "alternate")
  assert (config.augment.brightness, config.augment.contrast) == (0.1399, 0.1308)
  assert (config.model.airbench.activation, config.model.airbench.whitening_examples) == (
      "silu", 960)
  assert config.model.airbench.output_scale == 1 / 256 and config.model.airbench.head_unit_std


def test_silu_is_x_times_its_sigmoid_in_float32():
  x = np.linspace(-8, 8, 101, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(airbench.silu(jnp.asarray(x))), x / (1 + np.exp(-x)),
                             rtol=1e-6, atol=1e-7)
  rough = airbench.silu(jnp.asarray(x, jnp.bfloat16))
  assert rough.dtype == jnp.bfloat16


def test_the_whitening_keeps_gelu_under_silu():
  """cifar10_speedrun.py's CifarNet: nn.GELU() after the whitening, SiLU in the groups only:
  the first group's output is a SiLU group applied to GELU(whitening(images)), computed here
  from the whitening's 2x2 patches by hand."""
  from scipy.special import erf

  images = np.random.default_rng(6).normal(size=(4, 32, 32, 3)).astype(np.float32)
  model = models.Airbench94(conv_implementation="im2col", activation="silu")
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(images))["params"]
  whiten = dict(params["whiten"], kernel=jax.random.normal(jax.random.key(1),
                                                           params["whiten"]["kernel"].shape))
  params = dict(params, whiten=whiten)
  _, state = jax.jit(lambda params, images: model.apply(
      {"params": params}, images, mutable=["intermediates"],
      capture_intermediates=lambda module, _: module.name == "group1"))(params,
                                                                         jnp.asarray(images))
  got = state["intermediates"]["group1"]["__call__"][0]
  kernel = np.asarray(params["whiten"]["kernel"], np.float64).reshape(4, 3, -1)  # (dy dx), c, o
  patches = np.stack([images[:, i:i + 31, j:j + 31] for i in (0, 1) for j in (0, 1)], axis=3)
  whitened = np.einsum("nhwpc,pco->nhwo", patches, kernel) + np.asarray(params["whiten"]["bias"])
  after_gelu = whitened * (1 + erf(whitened / np.sqrt(2))) / 2
  group = airbench.ConvGroup(64, conv_implementation="im2col", activation="silu")
  want = jax.jit(group.apply)({"params": params["group1"]},
                              jnp.asarray(after_gelu, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_the_whitening_comes_from_the_first_960_images():
  config = cifar10_speedrun.get_config()
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (1000, 4, 4, 3), dtype=np.uint8)
  images[960:] = 255  # images after the first 960 must not count
  mean, std = np.array([.4, .5, .6], np.float32), np.array([.2, .25, .3], np.float32)
  params = {"whiten": {"kernel": jnp.zeros((2, 2, 3, 24)), "bias": jnp.ones(24)}}
  data = input_pipeline.Dataset(images, np.zeros(1000, np.int32), images[:1],
                                np.zeros(1, np.int32), mean, std, ("a", "b"))
  got = models.initialise_from_data(config.model, params, data)
  normalised = (images[:960].astype(np.float64) / 255 - mean) / std
  np.testing.assert_allclose(got["whiten"]["kernel"], airbench.whitening_kernel(normalised),
                             rtol=1e-4, atol=1e-4)


def test_colour_jitter_shifts_then_scales_each_image_within_its_ranges():
  """(x + b) c with one b in [-0.1399, 0.1399] and one c in [0.8692, 1.1308] an image, uniform:
  recovered from two pixels of each image, checked on every other pixel."""
  n = 4000
  x = jnp.broadcast_to(jnp.linspace(-2, 2, 4 * 4 * 3).reshape(1, 4, 4, 3), (n, 4, 4, 3))
  y = np.asarray(input_pipeline.jitter(jax.random.key(8), x, 0.1399, 0.1308), np.float64)
  x = np.asarray(x, np.float64)
  first, last = (0, 0, 0, 0), (0, 3, 3, 2)
  c = (y[:, 3, 3, 2] - y[:, 0, 0, 0]) / (x[0][last[1:]] - x[0][first[1:]])
  b = y[:, 0, 0, 0] / c - x[0][first[1:]]
  np.testing.assert_allclose(y, (x + b[:, None, None, None]) * c[:, None, None, None],
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.abs(b) <= 0.1399 + 1e-6) and np.all(np.abs(c - 1) <= 0.1308 + 1e-6)
  # Uniform: mean 0 and std range / sqrt(3), within 4 standard errors; b and c independent.
  for draws, width in ((b, 0.1399), (c - 1, 0.1308)):
    assert abs(draws.mean()) < 4 * width / np.sqrt(3 * n)
    assert draws.std() == pytest.approx(width / np.sqrt(3), rel=0.05)
  assert abs(np.corrcoef(b, c)[0, 1]) < 4 / np.sqrt(n)


def _linear_state():
  import optax

  def apply_fn(variables, images):
    return images.reshape(len(images), -1) @ variables["params"]["w"]

  w = jnp.asarray(np.random.default_rng(9).normal(size=(4 * 4 * 3, 3)) * 0.1, jnp.float32)
  return steps.TrainState.create(apply_fn=apply_fn, params={"w": w}, tx=optax.sgd(0.0))


def test_the_training_epoch_jitters_only_when_asked_and_keeps_the_crops():
  images = np.random.default_rng(10).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
  labels = np.arange(8, dtype=np.int32) % 3
  state, zeros, ones = _linear_state(), jnp.zeros(3), jnp.ones(3)
  epoch = jax.jit(functools.partial(whole_epochs.train_epoch, batch_size=4,
                                    drop_last_batch=True), static_argnames="augment")
  run = functools.partial(epoch, state, images, labels, jax.random.key(11), 0, zeros, ones)
  plain = run(augment=steps.AugmentOptions(translate=1, padding="reflect"))[1]
  still = run(augment=steps.AugmentOptions(translate=1, padding="reflect", brightness=0.0,
                                           contrast=0.0))[1]
  jittered = run(augment=steps.AugmentOptions(translate=1, padding="reflect", brightness=0.1,
                                              contrast=0.1))[1]
  assert float(still["loss_sum"]) == float(plain["loss_sum"])
  assert abs(float(jittered["loss_sum"]) - float(plain["loss_sum"])) > 1e-4
  # A tiny jitter moves the loss by a tiny amount: the same crops and flips underneath.
  tiny = run(augment=steps.AugmentOptions(translate=1, padding="reflect", brightness=1e-5,
                                          contrast=1e-5))[1]
  assert float(tiny["loss_sum"]) == pytest.approx(float(plain["loss_sum"]), rel=1e-3)


def test_a_fractional_late_freeze_counts_whole_steps():
  assert StepBudget(32, 7.59, 0.19).late_freeze_step == 7  # ceil(6.08)
  assert StepBudget(100, 1, 0.07).late_freeze_step == 7  # 7.000000000000001 is 7 steps
  assert StepBudget(48, 9.9, 3).late_freeze_step == 144


def test_a_muon_workdir_saved_before_the_speedrun_keys_still_resumes(tmp_path):
  """A config.json written before the knobs: its muon group lacks four keys, the top level
  four; both get the values that run had (the defaults', airbench94_muon's)."""
  saved = json.loads((DATA / "flat_config_airbench94_muon.json").read_text())
  for key in ("airbench_activation", "airbench_whitening_examples", "augment_brightness",
              "augment_contrast"):
    del saved[key]
  for key in ("newton_schulz_coefficients", "weight_decay", "normalize_period",
              "normalize_period_growth"):
    del saved["muon"][key]
  files = workdir_lib.RunFiles(tmp_path)
  files.config.write_text(json.dumps(saved))
  config = cifar10_airbench94_muon.get_config()
  assert workdir_lib.check_workdir(files, prepare.run_identity(config)) == (
      workdir_lib.identity(saved))
  config.muon.normalize_period = 2
  with pytest.raises(UserError, match=r"muon.normalize_period: 2 here, 1 there"):
    workdir_lib.check_workdir(files, prepare.run_identity(config))
  # The defaults still hold what such a run computed.
  current = json.loads(default_config.get_config().to_json_best_effort())
  assert current["muon"]["newton_schulz_coefficients"] == [3.4445, -4.7750, 2.0315]


@pytest.mark.slow
def test_the_speedrun_recipe_learns_on_real_cifar10(cifar10_dir, tmp_path):
  """Two epochs of 4 steps of the recipe at batch 500 on 2,000 real training images."""
  last, records = real_runs.short_real_run(cifar10_speedrun.get_config(), cifar10_dir, tmp_path,
                                           train_examples=2000, batch_size=500, num_epochs=2)
  assert [r["epoch"] for r in records] == [0, 1]
  assert records[1]["train_loss"] < records[0]["train_loss"]
  assert records[1]["test_acc"] > 0.25  # chance is 0.1
  assert last == records[1] and 0.25 < last["tta_test_acc"] <= 1
