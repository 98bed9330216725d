"""`python -m convnet_jax.benchmark`: the accelerator benchmark (`convnet_jax.tools.benchmark`)."""

from convnet_jax.runs import cli
from convnet_jax.tools import benchmark

if __name__ == "__main__":
  benchmark.define_flags()
  cli.run(benchmark.main)
