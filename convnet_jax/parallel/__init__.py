"""Training on more than one device or model at once: the data-parallel mesh and its shardings
(`data_parallel`), the processes of a multi-process run (`processes`) and replicas, several
models trained together in one program (`replicas`).

May import `convnet_jax.errors` and nothing else of the package."""
