"""`python -m convnet_jax.predict --workdir W IMAGES...`: the class of each image, one JSON line
per image with the class name and its probability (`trained.TrainedModel.predict`).

IMAGES are 32x32 RGB image files (PNG, JPEG: anything Pillow reads) or numpy .npz files of
uint8 `images` (N x 32 x 32 x 3). BatchNorm normalises with precise statistics of the
training images by default (the run's `eval.batch_norm_statistics` where it names them, else
"population"; computed once, kept in the workdir): a handful of images normalised by their own
statistics would not get the model's predictions.
"""

# First, before JAX and the rest are imported: the restart that sets the C allocator
# (`runs.allocator`) then costs nothing (once imported, it would import everything again).
from convnet_jax.runs import allocator

if __name__ == "__main__":
  allocator.restart_with_tunables()

import json  # noqa: E402 (after the restart above)

from absl import flags

from convnet_jax.data import images as images_lib
from convnet_jax.errors import UserError
from convnet_jax.runs import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The run's folder (--workdir of convnet_jax.main).")
flags.mark_flags_as_required(["workdir"])
flags.DEFINE_enum("batch_norm_statistics", None, ["batch", "population", "augmented"],
                  "BatchNorm's statistics: precise statistics of the training images, as they "
                  "are or augmented as in training (default: the run's eval."
                  "batch_norm_statistics, or population where that is batch), or each batch's "
                  "own (as in training; refused for fewer images than the minimum, whose "
                  "predictions would not be the model's).")
flags.DEFINE_integer("batch_size", None, "Batch size (default: the run's eval.batch_size).")
flags.DEFINE_string("test_time_augmentation", "none", "none, mirror or mirror_translate.")
flags.DEFINE_string("data_dir", None, "Where the run's CIFAR-10 binary files are now, if not "
                    "where its config.json says.")
flags.DEFINE_integer("replica", 0, "Of a run that trained several replicas, which one.")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise UserError("expected image files (PNG, JPEG) or .npz files after the flags")
  names, images = images_lib.read_unlabelled(paths)  # before the model: a bad file costs nothing
  from convnet_jax import trained as trained_lib

  model = trained_lib.load(FLAGS.workdir, data_dir=FLAGS.data_dir, replica=FLAGS.replica)
  classes, probabilities = model.predict(
      images, batch_size=FLAGS.batch_size, batch_norm_statistics=FLAGS.batch_norm_statistics,
      test_time_augmentation=FLAGS.test_time_augmentation)
  for name, label, probability in zip(names, classes, probabilities):
    print(json.dumps({"image": name, "class": model.class_names[label],
                      "probability": round(float(probability), 4)}), flush=True)


if __name__ == "__main__":
  cli.run(main, native_output_to_stderr=True)
