"""A tiny run for tests and quick checks: one short epoch, seconds on a CPU."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.data.max_train_examples = 200  # 3 full batches of 64 and a short one of 8
  config.data.max_test_examples = 100
  config.batch_size = 64
  config.eval.batch_size = 64
  config.num_epochs = 1
  config.benchmark.num_examples = 200
  config.benchmark.warmup_steps = 1
  config.benchmark.num_steps = 3
  config.benchmark.num_epochs = 1
  return config
