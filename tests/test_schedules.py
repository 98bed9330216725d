"""Learning-rate schedules at their boundaries, weight decay and Nesterov against PyTorch's SGD
written out by hand, the validation of the new config keys, and the shipped configs."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import cifar10_resnet18
from configs import cifar10_resnet18_short
from configs import cifar10_resnet50
from configs import default as default_config
from convnet_jax.runs import validation
from convnet_jax.errors import UserError
import built
from convnet_jax import budget as budget_lib


def _config(overrides=None):
  config = default_config.get_config()
  return built.with_values(config, overrides or {})


def test_linear_schedule_is_the_default_and_reaches_zero():
  config = _config({"num_epochs": 4})
  assert config.schedule.name == "linear"
  schedule = built.schedule(config, built.budget(config, 10))
  for step in (0, 10, 25, 39, 40):
    assert float(schedule(step)) == pytest.approx(0.1 * (1 - step / 40), rel=1e-6, abs=1e-9)


def test_step_schedule_drops_exactly_at_the_boundary_steps():
  config = _config({
      "schedule.name": "step", "num_epochs": 6, "schedule.boundaries_epochs": (2, 4),
      "schedule.decay_factor": 0.1})
  schedule = built.schedule(config, built.budget(config, 10))
  expected = {0: 0.1, 19: 0.1, 20: 0.01, 39: 0.01, 40: 0.001, 59: 0.001, 60: 0.001}
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step


def test_cosine_schedule_start_quarter_middle_end():
  config = _config({"schedule.name": "cosine", "num_epochs": 5})
  schedule = built.schedule(config, built.budget(config, 20))  # 100 steps
  for step in (0, 25, 50, 75, 99, 100):
    expected = 0.1 * (1 + math.cos(math.pi * step / 100)) / 2
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-7), step
  assert float(schedule(50)) == pytest.approx(0.05)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_resnet18_config_drops_at_epochs_100_and_150_in_steps():
  config = cifar10_resnet18.get_config()
  num_steps = budget_lib.steps_per_epoch(50_000, config.batch_size, config.data.drop_last_batch)
  assert num_steps == 391  # 390 batches of 128 and one of 80
  schedule = built.schedule(config, built.budget(config, num_steps))
  assert float(schedule(100 * 391 - 1)) == pytest.approx(0.1)
  assert float(schedule(100 * 391)) == pytest.approx(0.01)
  assert float(schedule(150 * 391 - 1)) == pytest.approx(0.01)
  assert float(schedule(150 * 391)) == pytest.approx(0.001)
  assert float(schedule(200 * 391)) == pytest.approx(0.001)


def _run_optimizer(config, params, gradients, steps_per_epoch=2):
  optimizer = built.optimizer(config, built.budget(config, steps_per_epoch))
  params = {key: jnp.asarray(value, jnp.float32) for key, value in params.items()}
  state = optimizer.init(params)
  for gradient in gradients:
    gradient = {key: jnp.asarray(value, jnp.float32) for key, value in gradient.items()}
    updates, state = optimizer.update(gradient, state, params)
    params = optax.apply_updates(params, updates)
  return {key: np.asarray(value) for key, value in params.items()}


W0 = {"kernel": np.array([1.0, -2.0, 0.5]), "bn_scale": np.array([1.0, 1.5]),
      "bn_offset": np.array([0.2, -0.3])}
GRADIENTS = [{"kernel": np.array([0.3, -0.1, 2.0]), "bn_scale": np.array([0.5, -0.5]),
              "bn_offset": np.array([0.1, 0.0])},
             {"kernel": np.array([-1.0, 0.4, 0.2]), "bn_scale": np.array([0.0, 0.25]),
              "bn_offset": np.array([-0.2, 0.3])},
             {"kernel": np.array([0.5, 0.5, -0.5]), "bn_scale": np.array([1.0, 0.0]),
              "bn_offset": np.array([0.0, 0.1])}]


def pytorch_sgd(w, gradients, learning_rates, momentum, weight_decay, nesterov):
  """torch.optim.SGD's update, dampening 0: d = g + wd w; b = m b + d (b = d at first);
  d = d + m b if nesterov else b; w = w - lr d."""
  buffer = None
  for g, lr in zip(gradients, learning_rates):
    d = g + weight_decay * w
    buffer = d if buffer is None else momentum * buffer + d
    d = d + momentum * buffer if nesterov else buffer
    w = w - lr * d
  return w


@pytest.mark.parametrize("nesterov", [False, True])
def test_weight_decay_and_momentum_match_pytorch_sgd(nesterov):
  # Step schedule: 2 steps per epoch, lr 0.1 for steps 0 and 1, then 0.1 * 0.5.
  config = _config({
      "schedule.name": "step", "num_epochs": 3, "schedule.boundaries_epochs": (1,),
      "schedule.decay_factor": 0.5, "optim.weight_decay": 5e-2, "optim.nesterov": nesterov})
  got = _run_optimizer(config, W0, GRADIENTS)
  for key in W0:  # BatchNorm's scale and offset are decayed like the weights
    expected = pytorch_sgd(W0[key], [g[key] for g in GRADIENTS], [0.1, 0.1, 0.05], 0.9, 5e-2,
                           nesterov)
    np.testing.assert_allclose(got[key], expected, rtol=1e-6, err_msg=key)


def test_weight_decay_pulls_towards_zero_by_hand():
  """One step with zero gradient and no momentum history: w = w - lr * wd * w."""
  config = _config({"schedule.name": "cosine", "optim.weight_decay": 5e-4})
  got = _run_optimizer(config, {"w": np.array([2.0, -4.0])}, [{"w": np.zeros(2)}])
  np.testing.assert_allclose(got["w"], [2.0 * (1 - 0.1 * 5e-4), -4.0 * (1 - 0.1 * 5e-4)],
                             rtol=1e-7)


def test_zero_weight_decay_leaves_plain_sgd():
  config = _config({"schedule.name": "step", "num_epochs": 3, "schedule.boundaries_epochs": (1,)})
  got = _run_optimizer(config, W0, GRADIENTS)
  expected = pytorch_sgd(W0["kernel"], [g["kernel"] for g in GRADIENTS], [0.1, 0.1, 0.01], 0.9,
                         0.0, False)
  np.testing.assert_allclose(got["kernel"], expected, rtol=1e-6)


@pytest.mark.parametrize("config_module", [cifar10_resnet18, cifar10_resnet50,
                                           cifar10_resnet18_short, default_config])
def test_shipped_configs_are_valid(config_module):
  validation.validate_config(config_module.get_config())


def test_resnet_configs_follow_the_tutorial_recipe():
  for module, model in ((cifar10_resnet18, "resnet18"), (cifar10_resnet50, "resnet50")):
    config = module.get_config()
    assert config.model.name == model and config.data.classes == tuple(range(10))
    assert config.augment.enabled and config.schedule.name == "step"
    assert config.schedule.boundaries_epochs == (100, 150) and config.schedule.decay_factor == 0.1
    assert config.optim.weight_decay == 5e-4 and config.optim.momentum == 0.9
    assert not config.optim.nesterov
    assert config.optim.learning_rate == 0.1 and config.num_epochs == 200
  short = cifar10_resnet18_short.get_config()
  num_steps = budget_lib.steps_per_epoch(short.data.max_train_examples, short.batch_size,
                                         short.data.drop_last_batch)
  assert short.model.name == "resnet18" and 50 <= num_steps * short.num_epochs <= 400


def test_default_config_keeps_the_seed_run():
  config = default_config.get_config()
  assert config.schedule.name == "linear" and config.optim.weight_decay == 0.0
  assert not config.augment.enabled
  assert config.model.name == "seed_convnet" and not config.optim.nesterov


BAD_VALUES = [
    ({"model.name": "resnet101"}, "config.model.name='resnet101': expected one of"),
    ({"schedule.name": "exponential"}, "config.schedule.name='exponential': expected one of"),
    ({"schedule.name": "step", "schedule.boundaries_epochs": (3, 2)},
     "config.schedule.boundaries_epochs=(3, 2): expected strictly increasing"),
    ({"schedule.name": "step", "schedule.boundaries_epochs": (2, 5)},
     "config.schedule.boundaries_epochs=(2, 5): expected epochs between 1 and num_epochs - 1 = 4"),
    ({"schedule.name": "step", "schedule.boundaries_epochs": (0,)},
     "config.schedule.boundaries_epochs=(0,): expected epochs between 1"),
    ({"schedule.name": "step", "schedule.boundaries_epochs": (1.5,)},
     "config.schedule.boundaries_epochs=(1.5,): expected a tuple of integer epochs"),
    ({"schedule.name": "step", "schedule.boundaries_epochs": (1,), "schedule.decay_factor": 0.0},
     "config.schedule.decay_factor=0.0: expected a number in (0, 1]"),
    ({"schedule.name": "step", "schedule.boundaries_epochs": (1,), "schedule.decay_factor": 10},
     "config.schedule.decay_factor=10: expected a number in (0, 1]"),
    ({"optim.weight_decay": -5e-4},
     "config.optim.weight_decay=-0.0005: expected a non-negative number"),
    ({"augment.enabled": 1}, "config.augment.enabled=1: expected True or False"),
    ({"optim.nesterov": "yes"}, "config.optim.nesterov='yes': expected True or False"),
    ({"optim.nesterov": True, "optim.momentum": 0.0},
     "config.optim.nesterov=True: expected False when"),
    ({"model.resnet.width": 0}, "config.model.resnet.width=0: expected a positive integer"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES)
def test_bad_values_of_the_new_keys_are_named(overrides, message):
  # A fresh ConfigDict: overriding the default's would refuse a value of another type itself
  # (as the command line does), but a config file can still set one.
  values = _config().to_dict()
  for key, value in overrides.items():
    group, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    node = values
    for part in filter(None, group.split(".")):
      node = node[part]
    node[leaf] = value
  config = ml_collections.ConfigDict(values)
  with pytest.raises(UserError) as error:
    validation.validate_config(config)
  assert str(error.value).startswith(message), str(error.value)
  assert "\n" not in str(error.value)


def test_boundaries_are_only_checked_for_the_step_schedule():
  validation.validate_config(_config({
      "schedule.name": "cosine", "schedule.boundaries_epochs": (100, 150)}))
