"""convnet_jax: a small, exactly specified ResNet trainer for CIFAR in JAX/Flax.

`convnet_jax.load(workdir)` gives a trained run's model back (`convnet_jax.trained`).
"""


def load(workdir, **options):
  """The model of a run's newest intact checkpoint: `convnet_jax.trained.load` (imported on
  first use, so that importing the package starts nothing: the commands restart for the C
  allocator before JAX is imported)."""
  from convnet_jax import trained

  return trained.load(workdir, **options)
