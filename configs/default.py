"""The seed run: the specification's convnet on CIFAR-2 (CIFAR-10 classes 0 and 1), 5 epochs."""

import ml_collections


def get_config():
  """Returns the default configuration; other configs import it and override what differs."""
  config = ml_collections.ConfigDict()

  config.model = "seed_convnet"
  # Compute dtype for convolutions and matmuls ("float32" or "bfloat16"); parameters and
  # BatchNorm statistics stay float32.
  config.dtype = "float32"
  # How convolutions are computed: "im2col" (patches times kernel, fastest on CPU), "xla"
  # (native convolution, for GPU/TPU) or "auto" (im2col on CPU, xla elsewhere). Same math.
  config.conv_implementation = "auto"

  config.dataset = "cifar10"
  config.classes = (0, 1)  # kept and relabelled 0..k-1 in this order
  # A folder with the CIFAR-10 binary files (data_batch_1.bin ... test_batch.bin). Empty: use
  # tensorflow-datasets, with these two folders (empty: tfds' defaults).
  config.data_dir = ""
  config.tfds_data_dir = ""
  config.tfds_manual_dir = ""
  # Use only the first N examples of each split (0: all), for quick runs.
  config.max_train_examples = 0
  config.max_test_examples = 0

  config.batch_size = 128
  config.eval_batch_size = 128
  config.drop_last_batch = False  # False: every example once per epoch, last batch short
  config.num_epochs = 5
  config.learning_rate = 0.1  # decays linearly to 0 over all steps
  config.momentum = 0.9
  config.nesterov = False
  config.seed = 0

  # Checkpoints (orbax, in WORKDIR/checkpoints): every N epochs and at the end, keeping the
  # newest few. Restarting with the same workdir and config resumes from the newest intact one.
  config.checkpoint_every_epochs = 1
  config.max_checkpoints_to_keep = 3
  config.tensorboard = True  # scalars in WORKDIR/tensorboard (tensorboardX, no TensorFlow)
  config.progress_bar = True  # an epoch bar with ETA on stderr, drawn only in a terminal
  config.trace_shapes = False  # print the shapes of the first training step to stderr

  # `python -m convnet_jax.benchmark`: synthetic data of the training set's size; empty lists
  # mean the config's own batch_size / dtype.
  config.benchmark = ml_collections.ConfigDict()
  config.benchmark.batch_sizes = ()
  config.benchmark.dtypes = ()
  config.benchmark.num_examples = 10_000
  config.benchmark.warmup_steps = 3
  config.benchmark.num_steps = 20
  config.benchmark.num_epochs = 2
  return config
