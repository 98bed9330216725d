"""`python -m convnet_jax.plot WORKDIR [--output FILE]`: training curves (`tools.plot`)."""

import sys

from convnet_jax.tools import plot

if __name__ == "__main__":
  sys.exit(plot.main())
