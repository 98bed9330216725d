"""Command line: `python -m convnet_jax.main --config configs/default.py [--workdir DIR]`.

Only parses flags (starting JAX's multi-process runtime when asked) and hands over to
`train.train_and_evaluate`.
"""

# First, before JAX and the rest are imported: the restart that sets the C allocator
# (`runs.allocator`) then costs nothing (once imported, it would import everything again).
from convnet_jax.runs import allocator

if __name__ == "__main__":
  allocator.restart_with_tunables()

import sys  # noqa: E402 (after the restart above)
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from convnet_jax import train
from convnet_jax.parallel import processes
from convnet_jax.runs import cli
from convnet_jax.runs import validation
from convnet_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl and preds "
                    "(default: runs/<config name>-<date>-<time>).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])
flags.DEFINE_bool("distributed", False, "Multi-process run: call jax.distributed.initialize() "
                  "first, which finds the cluster itself on Cloud TPU, SLURM and Open MPI, or "
                  "from the three flags below.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies "
                    "--distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1 (with "
                     "--coordinator_address).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = FLAGS.workdir
  if FLAGS.distributed or FLAGS.coordinator_address:
    if not workdir:  # processes started seconds apart would each name their own
      raise UserError("--workdir: expected the same folder for every process of a "
                      "multi-process run")
    validation.validate_config(FLAGS.config)  # its timeout, before joining the others
    processes.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, FLAGS.config.operations.peer_timeout_seconds)
  if not workdir:
    config_name = FLAGS["config"].value and FLAGS["config"].config_filename
    stem = config_name.rsplit("/", 1)[-1].removesuffix(".py") if config_name else "run"
    workdir = f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"workdir: {workdir}", file=sys.stderr)
  with processes.PeerWatch(FLAGS.config.operations.peer_timeout_seconds, workdir):
    train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
  cli.run(main, native_output_to_stderr=True)
