"""convnet_jax: a small, exactly specified ResNet trainer for CIFAR in JAX/Flax."""
