"""The default (seed) run over 10 seeds at once: 10 replicas of the seed convnet trained together
in one compiled program (vmap), seeds 0-9, each exactly as `configs/default.py --config.seed=i`
would start it. Prints per-epoch JSON lines with every replica's metrics and the mean, sample
std, min and max of the test accuracy; the last line on stderr sums it up."""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.replicas.count = 10
  return config
