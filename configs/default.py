"""The seed run: the specification's convnet on CIFAR-2 (CIFAR-10 classes 0 and 1), 5 epochs."""

import ml_collections

from convnet_jax import download


def get_config():
  """Returns the default configuration; other configs import it and override what differs."""
  config = ml_collections.ConfigDict()

  # "seed_convnet" (the specification's net) or a CIFAR ResNet: "resnet18", "resnet34" (basic
  # blocks) or "resnet50" (bottleneck blocks).
  config.model = "seed_convnet"
  # ResNets only: channels of the stem and the first stage (the stages have 1, 2, 4 and 8 times
  # this, times the block's expansion); 64 is the standard ResNet, smaller widths are for quick
  # runs.
  config.resnet_width = 64
  # Compute dtype for convolutions and matmuls ("float32" or "bfloat16"); parameters and
  # BatchNorm statistics stay float32.
  config.dtype = "float32"
  # How convolutions are computed (same math, other last digits; see convnet_jax/conv.py):
  # "onednn" (XLA FFI custom calls into oneDNN, fastest on x86-64 CPUs), "im2col" (patches
  # times kernel, pure JAX), "xla" (native convolution, for GPU/TPU), "hybrid", or "auto":
  # onednn on an x86-64 CPU where the extension was built (float32, one device), im2col on
  # other CPUs, xla on GPU/TPU. The run's first stderr line says which runs and why.
  config.conv_implementation = "auto"

  config.dataset = "cifar10"
  config.classes = (0, 1)  # kept and relabelled 0..k-1 in this order
  # Where the images come from: "binary" (CIFAR-10's binary files, read with numpy) or "tfds"
  # (tensorflow-datasets' cifar10; preparing it the first time needs `pip install
  # 'convnet_jax[tfds]'`, i.e. TensorFlow).
  config.data_source = "binary"
  # "binary": a folder with the CIFAR-10 binary files (data_batch_1.bin ... test_batch.bin),
  # used as it is. Empty: $CONVNET_JAX_DATA_DIR, else the per-user cache
  # (~/.cache/convnet_jax/cifar10), where data_url is fetched once (SHA-256 data_sha256) and
  # unpacked when the files are missing.
  config.data_dir = ""
  config.data_url = download.CIFAR10_URL
  config.data_sha256 = download.CIFAR10_SHA256
  # "tfds": tfds' data folder and manual-download folder (empty: tfds' defaults).
  config.tfds_data_dir = ""
  config.tfds_manual_dir = ""
  # Use only the first N examples of each split (0: all), for quick runs.
  config.max_train_examples = 0
  config.max_test_examples = 0

  config.batch_size = 128
  config.eval_batch_size = 128
  config.drop_last_batch = False  # False: every example once per epoch, last batch short
  config.num_epochs = 5
  # Training-set augmentation on the device: 4-pixel zero pad, random crop back to 32x32 and
  # random horizontal flip, fresh every epoch. The test set is only normalised.
  config.augment = False
  config.learning_rate = 0.1  # the peak; `schedule` says how it changes
  # "linear" (to 0 over all steps), "step" (times lr_decay_factor at each epoch of
  # lr_boundaries_epochs) or "cosine" (half a cosine from learning_rate to 0 over all steps).
  config.schedule = "linear"
  config.lr_boundaries_epochs = ()  # "step" only: increasing epochs in (0, num_epochs)
  config.lr_decay_factor = 0.1  # "step" only
  config.momentum = 0.9
  config.nesterov = False
  # PyTorch SGD's weight decay (gradient += weight_decay * parameter, before the momentum), on
  # every parameter, BatchNorm's scale and offset included.
  config.weight_decay = 0.0
  config.seed = 0

  # Replicas: train this many models at once in one compiled program (vmap over parameters,
  # optimiser states and data order), for multi-seed statistics and dense sweeps. Replica i has
  # seed replica_seeds[i] (empty: seed + i) and peak learning rate / momentum
  # replica_learning_rates[i] / replica_momenta[i] (empty: learning_rate / momentum for all).
  config.num_replicas = 1
  config.replica_seeds = ()
  config.replica_learning_rates = ()
  config.replica_momenta = ()

  # How a run is operated, not what it computes: a workdir may be resumed with other values
  # here (e.g. on a machine with more devices). Everything outside this group and `benchmark`
  # defines the run.
  config.operations = ml_collections.ConfigDict()
  # Data parallel: each batch is split over this many devices (0: all devices, of all processes
  # in a jax.distributed run); batch sizes must be multiples of it. Same math as one device.
  config.operations.num_devices = 0
  # Checkpoints (orbax, in WORKDIR/checkpoints): every N epochs and at the end, keeping the
  # newest few. Restarting with the same workdir and config resumes from the newest intact one.
  config.operations.checkpoint_every_epochs = 1
  config.operations.max_checkpoints_to_keep = 3
  # Scalars in WORKDIR/tensorboard (tensorboardX, no TensorFlow).
  config.operations.tensorboard = True
  # An epoch bar with ETA on stderr, drawn only in a terminal.
  config.operations.progress_bar = True
  # Print the shapes of the first training step to stderr.
  config.operations.trace_shapes = False

  # `python -m convnet_jax.benchmark`: synthetic data of the training set's size; empty
  # batch_sizes / dtypes mean the config's own.
  config.benchmark = ml_collections.ConfigDict()
  config.benchmark.batch_sizes = ()
  config.benchmark.dtypes = ()
  config.benchmark.num_examples = 10_000
  config.benchmark.warmup_steps = 3
  config.benchmark.num_steps = 20
  config.benchmark.num_epochs = 2
  # Also time one epoch of N replicas trained together, for each N listed (empty: skip).
  config.benchmark.num_replicas = ()
  return config
