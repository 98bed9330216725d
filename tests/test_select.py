"""airbench96_faster's data selection (`config.select`): the step against a hand computation on
linear models, the proxy's schedule, its frozen parameters in the airbench network, the config
against the script's numbers, and the bad values named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state

import built
from configs import cifar10_airbench96
from configs import cifar10_airbench96_faster
from configs import default as default_config
from convnet_jax import models
from convnet_jax import optim
from convnet_jax import steps
from convnet_jax import train
from convnet_jax.errors import UserError
from convnet_jax.runs import prepare
from convnet_jax.runs import validation

NUM_FEATURES, NUM_CLASSES, BATCH = 6, 3, 8
MODEL_LR, PROXY_LR = 0.1, 0.5
# One optimiser object each, so that replicas' states have the same (static) tree metadata.
MODEL_TX, PROXY_TX = optax.sgd(MODEL_LR), optax.sgd(PROXY_LR)


def _linear(variables, x):
  return x.reshape(x.shape[0], -1) @ variables["params"]["w"]


def _linear_states(seed=0):
  """A model and a proxy, both linear classifiers (each example's loss independent of the
  batch), trained with plain SGD."""
  rng = np.random.default_rng(seed)
  model_w, proxy_w = (jnp.asarray(rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), jnp.float32)
                      for _ in range(2))
  proxy = flax_train_state.TrainState.create(apply_fn=_linear, params={"w": proxy_w},
                                             tx=PROXY_TX)
  return steps.SelectionTrainState.create(apply_fn=_linear, params={"w": model_w},
                                          tx=MODEL_TX, proxy=proxy)


def _softmax_grad(weights, x, labels):
  """Per-example losses and the gradient of their sum, for a linear classifier, in float64."""
  logits = x @ weights
  shifted = logits - logits.max(axis=1, keepdims=True)
  probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
  losses = -np.log(probabilities[np.arange(len(labels)), labels])
  one_hot = np.eye(NUM_CLASSES)[labels]
  return losses, x.T @ (probabilities - one_hot), logits


def test_a_step_trains_the_model_on_the_proxys_hardest_half_and_the_proxy_every_other_step():
  rng = np.random.default_rng(1)
  state = _linear_states()
  options = steps.StepOptions(loss_reduction="sum", keep_fraction=0.5, proxy_update_every=2)
  step = jax.jit(lambda state, x, y: steps.train_step(state, x, y, options))
  model_w = np.asarray(state.params["w"], np.float64)
  proxy_w = np.asarray(state.proxy.params["w"], np.float64)
  for step_index in range(3):
    x = rng.normal(size=(BATCH, NUM_FEATURES))
    labels = rng.integers(0, NUM_CLASSES, size=BATCH)
    proxy_losses, proxy_grad_all, _ = _softmax_grad(proxy_w, x, labels)
    kept = np.argsort(proxy_losses)[-BATCH // 2:]  # the four highest proxy losses
    state, metrics = step(state, jnp.asarray(x, jnp.float32), jnp.asarray(labels))
    # The model: one SGD step on the summed loss of the kept examples only.
    losses, grad, logits = _softmax_grad(model_w, x[kept], labels[kept])
    model_w = model_w - MODEL_LR * grad
    np.testing.assert_allclose(np.asarray(state.params["w"]), model_w, rtol=1e-5, atol=1e-6)
    assert float(metrics["loss_sum"]) == pytest.approx(losses.sum(), rel=1e-5)
    assert float(metrics["correct"]) == np.sum(logits.argmax(axis=1) == labels[kept])
    # The proxy: on steps 0 and 2, one step on the same kept examples' summed loss.
    if step_index % 2 == 0:
      _, proxy_grad, _ = _softmax_grad(proxy_w, x[kept], labels[kept])
      proxy_w = proxy_w - PROXY_LR * proxy_grad
    np.testing.assert_allclose(np.asarray(state.proxy.params["w"]), proxy_w, rtol=1e-5,
                               atol=1e-6)
  assert int(state.step) == 3 and int(state.proxy.step) == 2


def test_replicas_under_vmap_select_as_each_alone():
  """Under vmap the proxy's condition is batched (both branches run, one is kept)."""
  rng = np.random.default_rng(2)
  options = steps.StepOptions(loss_reduction="sum", keep_fraction=0.5, proxy_update_every=2)
  step = lambda state, x, y: steps.train_step(state, x, y, options)
  alone = [_linear_states(seed) for seed in (3, 4)]
  stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *alone)
  for _ in range(3):
    x = jnp.asarray(rng.normal(size=(2, BATCH, NUM_FEATURES)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(2, BATCH)))
    stacked, _ = jax.jit(jax.vmap(step))(stacked, x, labels)
    alone = [jax.jit(step)(state, x[i], labels[i])[0] for i, state in enumerate(alone)]
  for i, state in enumerate(alone):
    np.testing.assert_allclose(np.asarray(stacked.params["w"][i]), np.asarray(state.params["w"]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stacked.proxy.params["w"][i]),
                               np.asarray(state.proxy.params["w"]), rtol=1e-6)


def test_the_kept_count_and_the_trained_examples():
  assert [steps.kept_count(n, 0.5) for n in (1024, 1023, 3, 1)] == [512, 512, 2, 1]
  assert steps.kept_count(1024, 1.0) == 1024
  # 10 examples in batches of 4 (4, 4, 2), half of each kept: 2, 2, 1.
  np.testing.assert_array_equal(steps.batch_sizes(10, 4, 3, 0.5), [2, 2, 1])
  assert train.examples_trained(10, 4, 3, 0.5) == 5
  assert train.examples_trained(10, 4, 2, 0.5) == 4  # the short batch dropped
  assert train.examples_trained(10, 4, 3) == 10


def test_the_proxys_nth_update_takes_the_schedule_at_step_k_n():
  """Plain SGD (no momentum) on the default linear schedule, 0.1 (1 - t / 10) over 10 steps:
  an optimiser updating every 4th step takes lr(0), lr(4), lr(8)."""
  config = default_config.get_config()
  config.optim.momentum = 0.0
  budget = built.budget(config, 2)
  assert budget.total_steps == 10
  tx = optim.create_optimizer(prepare.optimizer_options(config), budget, steps_per_update=4)
  params = jnp.zeros(())
  opt_state = tx.init(params)
  for n in range(3):
    updates, opt_state = tx.update(jnp.ones(()), opt_state, params)
    assert float(updates) == pytest.approx(-0.1 * (1 - 4 * n / 10), abs=1e-7)


def test_the_airbench_proxy_has_its_own_groups_and_never_trains_its_whitening():
  config = cifar10_airbench96_faster.get_config()
  config.model.airbench.widths, config.select.proxy_widths = (16, 16, 16), (16, 16, 16)
  config.model.conv_implementation = "im2col"
  model = models.create_model(config.model, 10)
  budget = built.budget(config, 10)
  proxy = prepare.create_proxy(config, model, budget)
  assert (proxy.model.widths, proxy.model.convs_per_group) == ((16, 16, 16), 2)
  assert model.convs_per_group == 3
  state = steps.create_train_state(model, jax.random.key(0), optim.create_optimizer(
      prepare.optimizer_options(config), budget), with_lookahead=True, proxy=proxy)
  assert "conv3" in str(jax.tree_util.tree_structure(state.params))
  assert "conv3" not in str(jax.tree_util.tree_structure(state.proxy.params))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=8))
  before = state.proxy.params
  new, _ = jax.jit(lambda s: steps.train_step(s, images, labels,
                                              prepare.step_options(config, budget)))(state)
  after = new.proxy.params
  assert int(new.proxy.step) == 1  # step 0 is an update step
  # Frozen in the proxy from the start: the whitening kernel and bias (the bias is late-frozen
  # in the model); trained: the head.
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(after["whiten"][name], before["whiten"][name])
  assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])


def test_the_faster_recipe_is_the_script():
  faster, base = cifar10_airbench96_faster.get_config(), cifar10_airbench96.get_config()
  # airbench96_faster.py: train_epochs 45, batch_size_masked 512 of 1,024, proxy widths
  # 32/64/64 at depth 2, a proxy backward pass every 4th step (`current_steps % 4 == 0`).
  assert (faster.num_epochs, faster.batch_size) == (45.0, 1024)
  assert steps.kept_count(faster.batch_size, faster.select.keep_fraction) == 512
  assert tuple(faster.select.proxy_widths) == (32, 64, 64)
  assert (faster.select.proxy_convs_per_group, faster.select.proxy_update_every) == (2, 4)
  # Its bias switch (epoch == 3 * steps_per_epoch) never fires: the bias trains to the end.
  budget = prepare.step_budget(faster, 50_000)
  assert (budget.total_steps, budget.late_freeze_step) == (2160, 2160)
  faster.num_epochs, faster.freeze.late_epochs = base.num_epochs, base.freeze.late_epochs
  faster.select = base.select
  assert faster == base
  validation.validate_config(cifar10_airbench96_faster.get_config())


@pytest.mark.parametrize("key, value, message", [
    ("select.keep_fraction", 0.0, "expected a number in (0, 1] (1: no data selection)"),
    ("select.keep_fraction", 1.5, "expected a number in (0, 1]"),
    ("select.proxy_widths", (32, 64), "expected three positive integers"),
    ("select.proxy_convs_per_group", 4, "expected 2 (airbench94's groups) or 3"),
    ("select.proxy_update_every", 0, "expected a positive number of steps"),
])
def test_bad_values_of_the_selection_are_named(key, value, message):
  config = cifar10_airbench96_faster.get_config()
  error = built.validation_error(config, key, value)
  assert error.startswith(f"config.{key}=") and message in error


def test_selection_needs_the_airbench_network():
  config = default_config.get_config()
  config.select.keep_fraction = 0.5
  with pytest.raises(UserError, match=r"^config.select.keep_fraction=0.5: expected 1 with "
                                      r"config.model.name='seed_convnet'"):
    validation.validate_config(config)


def _tiny_faster_config(data_dir):
  """airbench96_faster at widths 16 on the 30-image folder: 3 steps of 8 an epoch, 4 kept."""
  config = cifar10_airbench96_faster.get_config()
  config.model.airbench.widths = config.select.proxy_widths = (16, 16, 16)
  config.model.airbench.whitening_examples = 30
  config.data.dir = str(data_dir)
  config.num_epochs, config.freeze.late_epochs = 2, 1
  config.batch_size, config.eval.batch_size = 8, 6
  config.select.proxy_update_every = 2
  config.operations.progress_bar = config.operations.tensorboard = False
  config.operations.checkpoint_every_epochs = 1
  return config


def test_a_run_with_selection_counts_the_kept_examples_and_resumes_exactly(tiny_cifar_dir,
                                                                         tmp_path, capsys):
  """The proxy is part of the checkpoint: a run resumed from its first epoch's checkpoint
  ends with the same numbers as the run never stopped."""
  import json
  import shutil

  config = _tiny_faster_config(tiny_cifar_dir)
  whole = train.train_and_evaluate(config, tmp_path / "whole")
  # The proxy's parameters by hand: whitening 2x2x3x24 + 24; group 1 3x3x24x16 + 3x3x16x16 and
  # two BatchNorm offsets of 16; groups 2 and 3 two 3x3x16x16 and two offsets each; head 16x10.
  proxy_count = (288 + 24) + (3456 + 2304 + 32) + 2 * (2 * 2304 + 32) + 160
  assert f"parameters (and a selection proxy of {proxy_count:,}) x 1 replicas" in \
      capsys.readouterr().err
  records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
  # 3 steps of 4 kept examples an epoch: accuracies in twelfths.
  for record in records:
    assert record["train_acc"] * 12 == pytest.approx(round(record["train_acc"] * 12))
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  # As if killed after epoch 0's checkpoint: epoch 1's checkpoint, line and predictions gone.
  resumed_dir = tmp_path / "resumed"
  shutil.rmtree(resumed_dir / "checkpoints" / "6")
  (resumed_dir / "preds").unlink()
  metrics = (resumed_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
  (resumed_dir / "metrics.jsonl").write_text(metrics[0])
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  assert (tmp_path / "resumed" / "checkpoints" / "6").is_dir()  # epoch 1 trained again
  for key in ("train_loss", "train_acc", "test_acc", "test_loss", "tta_test_acc"):
    assert resumed[key] == whole[key], key
