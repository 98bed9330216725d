"""`python -m convnet_jax.benchmark`: the accelerator benchmark (`convnet_jax.tools.benchmark`)."""

# First, before JAX and the rest are imported: the restart that sets the C allocator
# (`runs.allocator`) then costs nothing (once imported, it would import everything again).
from convnet_jax.runs import allocator

if __name__ == "__main__":
  allocator.restart_with_tunables()

from convnet_jax.runs import cli  # noqa: E402 (after the restart above)
from convnet_jax.tools import benchmark

if __name__ == "__main__":
  benchmark.define_flags()
  cli.run(benchmark.main)
