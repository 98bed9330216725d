"""The data: CIFAR-10 read from its binary files or tfds (`input_pipeline`, which also augments
and normalises on the device), its download (`download`), test-time augmentation (`tta`) and
image files for a trained model (`images`: labelled sets, PNG/JPEG/.npz).

May import `convnet_jax.errors` and nothing else of the package."""
