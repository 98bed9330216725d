"""A short run of a recipe on a slice of real CIFAR-10, for the recipes' real-data smokes: the
config's own network, optimiser and augmentation on fewer images, smaller batches and epochs."""

from __future__ import annotations

import json
from pathlib import Path

from convnet_jax import train


def short_real_run(config, cifar10_dir: Path, workdir: Path, *, train_examples: int,
                   batch_size: int, num_epochs: float, test_examples: int = 1000,
                   eval_batch_size: int = 500):
  """Trains `config` on the first `train_examples` real training images; returns the last
  record and every record of metrics.jsonl."""
  config.data.dir = str(cifar10_dir)
  config.data.max_train_examples, config.data.max_test_examples = train_examples, test_examples
  config.batch_size, config.eval.batch_size = batch_size, eval_batch_size
  config.num_epochs = num_epochs
  config.operations.tensorboard = False
  last = train.train_and_evaluate(config, workdir)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  return last, records
