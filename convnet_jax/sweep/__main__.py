"""`python -m convnet_jax.sweep --config configs/sweep_lr.py --workdir DIR` (`sweep.command`)."""

# First, before JAX and the rest are imported: the restart that sets the C allocator
# (`runs.allocator`) then costs nothing (once imported, it would import everything again).
from convnet_jax.runs import allocator

allocator.restart_with_tunables()

from convnet_jax.runs import cli  # noqa: E402 (after the restart above)
from convnet_jax.sweep import command

command.define_flags()
cli.run(command.main)
