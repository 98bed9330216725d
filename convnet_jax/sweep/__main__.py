"""`python -m convnet_jax.sweep --config configs/sweep_lr.py --workdir DIR` (`sweep.command`)."""

from convnet_jax.runs import cli
from convnet_jax.sweep import command

command.define_flags()
cli.run(command.main)
