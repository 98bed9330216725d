"""Hyperparameter sweeps, `python -m convnet_jax.sweep`: the command (`command`), the sweep
config and its checks (`config`), the optuna study and its storage (`study`), the report
(`report`).

May import everything else of the package; nothing imports it."""
