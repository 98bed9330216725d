"""Command line: `python -m convnet_jax.main --config configs/default.py [--workdir DIR]`.

Only parses flags and hands over to `train.train_and_evaluate`.
"""

import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from convnet_jax import train
from convnet_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl and preds "
                    "(default: runs/<config name>-<date>-<time>).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = FLAGS.workdir
  if not workdir:
    config_name = FLAGS["config"].value and FLAGS["config"].config_filename
    stem = config_name.rsplit("/", 1)[-1].removesuffix(".py") if config_name else "run"
    workdir = f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"workdir: {workdir}", file=sys.stderr)
  try:
    train.train_and_evaluate(FLAGS.config, workdir)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except train.TrainingDiverged as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
