"""Tools around training: the accelerator benchmark (`benchmark`), compiling ahead of time for
TPU topologies and GPUs (`aot`), training curves (`plot`), and the prepared check for a borrowed
GPU (`device_check`, which imports only the standard library and runs the others as commands);
`python -m convnet_jax.benchmark` and `python -m convnet_jax.plot` run the first and the last.

May import everything else of the package but `sweep`; nothing but the shims imports it."""
