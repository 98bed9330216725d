"""Tools around training: the accelerator benchmark (`benchmark`), compiling ahead of time for
TPU topologies and GPUs (`aot`), training curves (`plot`); `python -m convnet_jax.benchmark` and
`python -m convnet_jax.plot` run the first and the last.

May import everything else of the package but `sweep`; nothing but the shims imports it."""
