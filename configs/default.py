"""The seed run: the specification's convnet on CIFAR-2 (CIFAR-10 classes 0 and 1), 5 epochs.

Every key of every config, in groups by concern (as big_vision cuts its configs): each group goes
whole to the code that uses it (`model` to `models.create_model`, `data` to
`input_pipeline.load_dataset`, `optim`, `schedule`, `muon` and `freeze` to `optim`, ...). Three
keys stay at the top, as every part of a run counts with them: `seed`, `num_epochs` and
`batch_size`. Other configs import this one and override what differs.
"""

import ml_collections

from convnet_jax import optim
from convnet_jax.data import download
from convnet_jax.models import airbench


def get_config():
  """Returns the default configuration; other configs import it and override what differs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Epochs to train. A fraction trains part of one more epoch: the run takes
  # ceil(steps_per_epoch * num_epochs) steps (airbench's 9.9 epochs of 48 steps: 476, the last
  # epoch stopping after 44), and every schedule spans those steps.
  config.num_epochs = 5.0
  config.batch_size = 128

  # The network (`models.create_model`).
  config.model = ml_collections.ConfigDict()
  # "seed_convnet" (the specification's net), a CIFAR ResNet: "resnet18", "resnet34" (basic
  # blocks) or "resnet50" (bottleneck blocks), or "airbench94" (airbench's speed-run network;
  # its whitening layer is computed from the first training images).
  config.model.name = "seed_convnet"
  # Compute dtype for convolutions and matmuls ("float32" or "bfloat16"); parameters,
  # BatchNorm (statistics, scale and offset), the activations and the loss stay float32.
  # "auto": bfloat16 on GPU, TPU and CPUs with bfloat16 arithmetic (AVX512_BF16 or AMX), float32
  # on other CPUs (no faster in bfloat16 there); resolved at start-up, kept in config.json.
  config.model.dtype = "float32"
  # How convolutions are computed (same math, other last digits; see convnet_jax/ops/conv.py):
  # "onednn" (XLA FFI custom calls into oneDNN, fastest on x86-64 CPUs), "im2col" (patches
  # times kernel, pure JAX), "xla" (native convolution, for GPU/TPU), "hybrid", or "auto":
  # onednn on an x86-64 CPU where the extension was built (float32 or bfloat16, any number of
  # data-parallel devices), im2col on other CPUs, xla on GPU/TPU. The run's first stderr line
  # says which runs and why.
  config.model.conv_implementation = "auto"
  # How BatchNorm is computed (same math, other last digits): "onednn" (oneDNN's batch
  # normalisation primitive, with a learnt offset and the ReLU in the same pass where no scale
  # comes between them: float32, and bfloat16 without a scale where the CPU has bfloat16
  # arithmetic, on one device; other maps and data-parallel meshes run "jax"), "jax" (XLA's
  # fusions), or "auto": onednn where the convolutions run in oneDNN, jax elsewhere.
  config.model.batch_norm_implementation = "auto"
  # The ResNets: channels of the stem and the first stage (the stages have 1, 2, 4 and 8 times
  # this, times the block's expansion); 64 is the standard ResNet, smaller widths are for quick
  # runs.
  config.model.resnet = ml_collections.ConfigDict()
  config.model.resnet.width = 64
  # airbench94 (and the recipes built on it):
  config.model.airbench = ml_collections.ConfigDict()
  # the output channels of its three conv groups, and the convolutions in each: 2
  # (airbench94's, airbench95's) or 3 (airbench96's, a residual over the last two);
  config.model.airbench.widths = (64, 256, 256)
  config.model.airbench.convs_per_group = 2
  # the logits are the head's output times output_scale (airbench94: 1/9; airbench94_muon:
  # 1/256, one over the head's width), and head_unit_std scales the head's initial weights to
  # standard deviation 1 (airbench94_muon);
  config.model.airbench.output_scale = 1 / 9
  config.model.airbench.head_unit_std = False
  # the activation after every BatchNorm, "gelu" (airbench's exact erf GELU) or "silu"
  # (hiverge/cifar10-speedrun's, cheaper; the whitening's stays GELU);
  config.model.airbench.activation = "gelu"
  # how many of the first training images the whitening kernel is computed from (airbench:
  # 5,000; hiverge: 960).
  config.model.airbench.whitening_examples = airbench.WHITENING_EXAMPLES

  # The images (`input_pipeline.load_dataset`).
  config.data = ml_collections.ConfigDict()
  config.data.dataset = "cifar10"
  config.data.classes = (0, 1)  # kept and relabelled 0..k-1 in this order
  # Where the images come from: "binary" (CIFAR-10's binary files, read with numpy) or "tfds"
  # (tensorflow-datasets' cifar10; preparing it the first time needs `pip install
  # 'convnet_jax[tfds]'`, i.e. TensorFlow).
  config.data.source = "binary"
  # "binary": a folder with the CIFAR-10 binary files (data_batch_1.bin ... test_batch.bin),
  # used as it is. Empty: $CONVNET_JAX_DATA_DIR, else the per-user cache
  # (~/.cache/convnet_jax/cifar10), where `url` is fetched once (SHA-256 `sha256`) and
  # unpacked when the files are missing.
  config.data.dir = ""
  config.data.url = download.CIFAR10_URL
  config.data.sha256 = download.CIFAR10_SHA256
  # "tfds": tfds' data folder and manual-download folder (empty: tfds' defaults).
  config.data.tfds_data_dir = ""
  config.data.tfds_manual_dir = ""
  # Use only the first N examples of each split (0: all), for quick runs.
  config.data.max_train_examples = 0
  config.data.max_test_examples = 0
  # False: every training example once per epoch, the last batch short; True: that short
  # batch dropped.
  config.data.drop_last_batch = False

  # Training-set augmentation on the device, fresh every epoch (`steps.AugmentOptions`): when
  # enabled, pad by `translate` pixels ("zeros" or "reflect" padding), random crop back to
  # 32x32, and horizontal flips: "random" (each image with probability 1/2), "alternate" (each
  # image in every other epoch, airbench's; the half flipped in the first epoch drawn at
  # random) or "none". The test set is only normalised (but see eval.test_time_augmentation).
  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = False
  config.augment.translate = 4
  config.augment.padding = "zeros"
  config.augment.flip = "random"
  # Then, in normalised units, each image shifted by b and scaled by c, drawn uniformly per
  # image and step from [-brightness, brightness] and [1 - contrast, 1 + contrast]
  # (hiverge/cifar10-speedrun's colour jitter); 0 and 0: none.
  config.augment.brightness = 0.0
  config.augment.contrast = 0.0
  # Last, a square of cutout x cutout pixels of each image set to 0 (the channel means, as it is
  # normalised), anywhere it fits (airbench96's 12); 0: none.
  config.augment.cutout = 0

  # The loss and SGD (`optim.create_optimizer`).
  config.optim = ml_collections.ConfigDict()
  # Cross-entropy against label-smoothed targets ((1 - s) one_hot + s / classes), the "mean"
  # or the "sum" over the batch (airbench's; the gradient grows with the batch).
  config.optim.label_smoothing = 0.0
  config.optim.loss_reduction = "mean"
  config.optim.learning_rate = 0.1  # the peak; `schedule` says how it changes
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  # PyTorch SGD's weight decay (gradient += weight_decay * parameter, before the momentum), on
  # every parameter, BatchNorm's scale and offset included.
  config.optim.weight_decay = 0.0
  # True: learning_rate and weight_decay are airbench's decoupled values, per 1,024 examples of
  # a summed loss: PyTorch's learning rate is learning_rate / (1024 (1 + 1 / (1 - momentum)))
  # and its weight decay weight_decay * batch_size / learning_rate (see optim.py).
  config.optim.decoupled_hyperparameters = False
  # BatchNorm offsets learn this many times faster; their weight decay per step stays as it is.
  config.optim.offset_lr_multiplier = 1.0
  # The same for the parameters under other paths: pairs (path or prefix, multiplier), the
  # first that matches counting, e.g. (("whiten/bias", 0.08),). Together these are PyTorch
  # parameter groups of lr = multiplier x learning_rate, weight_decay = weight_decay / multiplier.
  config.optim.lr_multipliers = ()

  # How the learning rate changes over the run's T steps (`optim.create_learning_rate_fn`):
  # "linear" (to 0 over all steps), "step" (times decay_factor at each epoch of
  # boundaries_epochs), "cosine" (half a cosine from the peak to 0 over all steps) or
  # "warmup_linear" (airbench's: linearly from warmup_start_factor x the peak to the peak over
  # the first warmup_fraction of the steps, then linearly towards final_lr_factor x the peak,
  # reached after the last step).
  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = "linear"
  config.schedule.boundaries_epochs = ()  # "step" only: increasing epochs in (0, num_epochs)
  config.schedule.decay_factor = 0.1  # "step" only
  config.schedule.warmup_fraction = 0.23  # "warmup_linear" only, and the next two
  config.schedule.warmup_start_factor = 0.2
  config.schedule.final_lr_factor = 0.07

  # Muon (airbench94_muon's form, see optim.airbench_muon) for the 4-D convolution kernels under
  # these paths (e.g. ("group1", "group2", "group3")); empty: SGD trains everything. Its
  # learning rate lr(t) follows `schedule`'s shape from muon.learning_rate. A step re-normalises
  # a kernel to Frobenius norm sqrt(output channels) (normalize_filters), then moves it by the
  # Newton-Schulz orthogonalisation (newton_schulz_steps, in bfloat16, with the quintic's
  # coefficients newton_schulz_coefficients) of its Nesterov (or plain) momentum direction,
  # then multiplies it by 1 - lr(t) weight_decay (0: no decay, airbench's).
  config.muon = ml_collections.ConfigDict()
  config.muon.parameters = ()
  config.muon.learning_rate = 0.24
  config.muon.momentum = 0.6
  config.muon.nesterov = True
  config.muon.newton_schulz_steps = 3
  config.muon.normalize_filters = True
  config.muon.newton_schulz_coefficients = optim.NEWTON_SCHULZ_COEFFICIENTS
  config.muon.weight_decay = 0.0
  # How often the kernels are re-normalised: at step t (counted from 1) of T when at least
  # normalize_period + floor(normalize_period_growth t / T) steps have passed since the last
  # time (from 0): 1 and 0 every step (airbench's); hiverge's 2 and 15 start every other step
  # and end about every 17th.
  config.muon.normalize_period = 1
  config.muon.normalize_period_growth = 0

  # Lookahead (airbench's): every every_steps steps (0: never) a slow copy of the parameters
  # moves towards them, slow += (1 - d) (params - slow) with
  # d = decay * (step / total_steps) ** power, and the parameters become the slow copy; after
  # the last step too, without moving it.
  config.lookahead = ml_collections.ConfigDict()
  config.lookahead.every_steps = 0
  config.lookahead.decay = 0.95**5
  config.lookahead.power = 3.0

  # Parameters never trained (paths such as "whiten/kernel", or prefixes such as "whiten"),
  # and parameters trained only during the first late_epochs epochs: on the main schedule
  # ("main"), or on their own from the peak linearly to 0 at the step they freeze
  # ("linear_to_zero", airbench94_muon's whitening bias).
  config.freeze = ml_collections.ConfigDict()
  config.freeze.parameters = ()
  config.freeze.late_parameters = ()
  config.freeze.late_epochs = 0.0
  config.freeze.late_schedule = "main"

  # Data selection (airbench96_faster's): a small proxy network, trained in the same step,
  # scores each batch by its loss and the model trains only on the keep_fraction of highest
  # loss (1.0: the whole batch, no proxy). The proxy is an airbench net (model.name
  # "airbench94" only) of proxy_widths and proxy_convs_per_group, the rest as the model's; it
  # trains on the same selection with the run's SGD (its schedule, no Muon, no lookahead) every
  # proxy_update_every steps, with freeze.late_parameters frozen from the start.
  config.select = ml_collections.ConfigDict()
  config.select.keep_fraction = 1.0
  config.select.proxy_widths = (32, 64, 64)
  config.select.proxy_convs_per_group = 2
  config.select.proxy_update_every = 4

  # Replicas: train this many models at once in one compiled program (vmap over parameters,
  # optimiser states and data order), for multi-seed statistics and dense sweeps. Replica i has
  # seed seeds[i] (empty: seed + i) and peak learning rate / momentum learning_rates[i] /
  # momenta[i] (empty: optim.learning_rate / optim.momentum for all).
  config.replicas = ml_collections.ConfigDict()
  config.replicas.count = 1
  config.replicas.seeds = ()
  config.replicas.learning_rates = ()
  config.replicas.momenta = ()

  # The test set: evaluated in batches of batch_size (BatchNorm normalises each with its own
  # statistics), and after the last epoch also with test-time augmentation, reported as
  # tta_test_acc in the last JSON line: "mirror" (mean of the image's and its mirror image's
  # logits) or "mirror_translate" (airbench94's six views: that pair weighted 1/2, and the pairs
  # of the image translated by one pixel up-left and down-right, reflect-padded, 1/4 each);
  # "none". The first view is the image itself, so the last evaluation is one pass over the
  # views that also gives test_acc. (How often it is evaluated is operations.eval_every_epochs.)
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 128
  config.eval.test_time_augmentation = "none"
  # What BatchNorm normalises each test batch with: "batch", its own statistics (the
  # specification's BatchNorm, as in training); "population", precise BatchNorm statistics of
  # the first <= 10,000 un-augmented training images; "augmented", of those images augmented as
  # in training (airbench96's evaluation: its cutout moves the statistics training learnt for).
  # Computed in each evaluation from the parameters alone (`steps.population_statistics`).
  config.eval.batch_norm_statistics = "batch"

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
  # Also every N steps (0: only per epoch), named by the global step in WORKDIR/checkpoints. A
  # run resumes from the middle of an epoch exactly as if it had not stopped.
  config.operations.checkpoint_every_steps = 0
  # The test set is evaluated after every N epochs and always after the last (0: only after
  # the last, as airbench times its runs); the other epochs' records have no test_loss and
  # test_acc. Training is the same either way (evaluation draws no random numbers).
  config.operations.eval_every_epochs = 1
  # An epoch runs as calls of one compiled program; between calls the run can checkpoint, stop
  # on SIGTERM or Ctrl-C and move the progress bar. steps_per_call=0 sizes each call to take
  # about seconds_per_call at the measured step time (short epochs: one call per epoch, the
  # fastest), N runs N steps a call. The numbers are the same however an epoch is cut.
  config.operations.steps_per_call = 0
  config.operations.seconds_per_call = 10.0
  # JAX's persistent compilation cache: a later run with the same shapes loads its programs
  # instead of compiling them. "" = $CONVNET_JAX_COMPILATION_CACHE if set, else the per-user
  # ~/.cache/convnet_jax/xla; "off" turns it off; else a folder. Entries sit in a subfolder
  # named by jaxlib, the CPU and the oneDNN extension, so another machine's are never read.
  config.operations.compilation_cache = ""
  # Scalars in WORKDIR/tensorboard (tensorboardX, no TensorFlow).
  config.operations.tensorboard = True
  # A step bar with the epoch, images/s and ETA on stderr, drawn only in a terminal.
  config.operations.progress_bar = True
  # Print the shapes of the first training step to stderr.
  config.operations.trace_shapes = False
  # Multi-process runs (jax.distributed): a process that sends no heartbeat for this long is
  # taken as lost, and the others stop with one line naming it (the last checkpoint stays;
  # start every process again to resume). Also the time a finishing process waits for the rest.
  config.operations.peer_timeout_seconds = 60

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
  # Compile instead of timing, for a TPU topology that is not here (libtpu's names: "v5e:2x2",
  # "v4:2x2x1", ...; needs `pip install -e ".[tpu]"`), data parallel over all its chips, and
  # lower the same programs for each GPU platform listed. Reports memory per chip and the
  # compiler's estimates, never measured times (see docs/speed.md).
  config.benchmark.aot_topology = ""
  config.benchmark.aot_gpu_platforms = ("cuda", "rocm")
  return config
