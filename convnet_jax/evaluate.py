"""`python -m convnet_jax.evaluate --workdir W [--data PATH]`: a trained run's accuracy as one
JSON line (`trained.TrainedModel.evaluate`).

By default on the run's own test set, in its evaluation batch size, with the BatchNorm
statistics it evaluated with (`eval.batch_norm_statistics`): the run's last recorded accuracy.
`--data` evaluates another labelled set: a folder in CIFAR-10's binary layout (its
test_batch.bin), one binary batch file, or a numpy .npz of `images` (uint8, N x 32 x 32 x 3)
and `labels` (CIFAR-10 class numbers 0-9), keeping the classes the run trained on, as its own
test set does.
"""

# First, before JAX and the rest are imported: the restart that sets the C allocator
# (`runs.allocator`) then costs nothing (once imported, it would import everything again).
from convnet_jax.runs import allocator

if __name__ == "__main__":
  allocator.restart_with_tunables()

import json  # noqa: E402 (after the restart above)

from absl import app
from absl import flags

from convnet_jax.data import images as images_lib
from convnet_jax.runs import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's folder (--workdir of convnet_jax.main).")
flags.mark_flags_as_required(["workdir"])
flags.DEFINE_string("data", None, "Another labelled set: a CIFAR-10 binary folder or file, or an "
                    ".npz of images and labels (default: the run's test set).")
flags.DEFINE_enum("batch_norm_statistics", None, ["batch", "population", "augmented"],
                  "BatchNorm's statistics: each batch's own (as in training) or precise "
                  "statistics of the training images, as they are or augmented as in training "
                  "(computed once, kept in the workdir); default: the run's "
                  "eval.batch_norm_statistics.")
flags.DEFINE_integer("batch_size", None, "Evaluation batch size (default: the run's "
                     "eval.batch_size).")
flags.DEFINE_string("test_time_augmentation", None, "none, mirror or mirror_translate "
                    "(default: the run's eval.test_time_augmentation).")
flags.DEFINE_string("data_dir", None, "Where the run's CIFAR-10 binary files are now, if not "
                    "where its config.json says.")
flags.DEFINE_integer("replica", 0, "Of a run that trained several replicas, which one.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from convnet_jax import trained as trained_lib  # after the flags: a bad one costs no import

  model = trained_lib.load(FLAGS.workdir, data_dir=FLAGS.data_dir, replica=FLAGS.replica)
  images = labels = None
  if FLAGS.data:
    images, labels = images_lib.read_labelled(FLAGS.data, model.config.data.classes)
  record = model.evaluate(images, labels, batch_size=FLAGS.batch_size,
                          batch_norm_statistics=FLAGS.batch_norm_statistics,
                          test_time_augmentation=FLAGS.test_time_augmentation)
  source = FLAGS.data or "the run's test set"
  print(json.dumps({"workdir": str(model.workdir), "step": model.step,
                    "epochs": len(model.history), "data": source,
                    "batch_norm_statistics": (FLAGS.batch_norm_statistics
                                              or model.config.eval.batch_norm_statistics),
                    **record}),
        flush=True)


if __name__ == "__main__":
  cli.run(main, native_output_to_stderr=True)
