"""The convolutions: the paths a run can choose (`conv`: oneDNN custom calls, im2col, XLA's own)
and the loader of the optional oneDNN extension (`onednn`, built from `csrc/` by `pip install`).

May import `convnet_jax.parallel.data_parallel` (a mesh tells the oneDNN calls how to split a
batch) and `convnet_jax.errors`, nothing else of the package."""
