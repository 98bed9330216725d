"""The data: CIFAR-10 read from its binary files or tfds (`input_pipeline`, which also augments
and normalises on the device), its download (`download`) and test-time augmentation (`tta`).

May import `convnet_jax.errors` and nothing else of the package."""
