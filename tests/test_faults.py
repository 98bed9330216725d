"""Faults from outside the run: a full disk or a write that fails, a finished run started again,
a batch that does not fit in memory, a lost peer process, a sweep database that goes away. Each
ends with one line that names the problem, and nothing already written is lost.

The fast tests inject each fault into the piece that meets it; the slow ones meet the real
thing in a subprocess: a 2 MiB tmpfs (where this machine lets the test mount one), an
allocation larger than the machine, a real run started twice."""

import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
import sqlalchemy

from configs import default as default_config
import built
from conftest import REPO_ROOT
from convnet_jax.parallel import processes
from convnet_jax import errors
from convnet_jax.runs import checkpoints
from convnet_jax.runs import compile_cache
from convnet_jax.runs import logs
from convnet_jax.runs import prepare
from convnet_jax.runs import reporting
from convnet_jax.runs import stopping
from convnet_jax.runs import workdir as workdir_lib
from convnet_jax.errors import OutOfMemory
from convnet_jax.errors import RunStopped
from convnet_jax.errors import StorageUnavailable
from convnet_jax.errors import write_failure_reason
from convnet_jax.errors import WriteFailed
from convnet_jax.sweep import study as sweep_study

# tensorstore's words for a full disk, as orbax raised them from a real 2 MiB tmpfs.
TENSORSTORE_FULL_DISK = (
    'RESOURCE_EXHAUSTED: Error writing "opt_state.count/0" in OCDBT database at local file '
    '"/w/checkpoints/12.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
    'Failed writing: "/w/.../d/958df2": Failed to write 582882 bytes to file 13: No space left '
    "on device [os_error_code='28']")


# ---------------------------------------------------------------------------------------------
# A write that fails: the reason in the OS's words, the file, the checkpoint to resume from.

def test_the_reason_is_the_os_error_in_words():
  assert write_failure_reason(ValueError(TENSORSTORE_FULL_DISK)) == "no space left on device"
  assert write_failure_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == (
      "disk quota exceeded")
  assert write_failure_reason(PermissionError(errno.EACCES, "x")) == "permission denied"
  assert write_failure_reason(RuntimeError("no code\n here")) == "no code here"


def test_a_failed_write_names_the_intact_checkpoint_and_what_to_do():
  full = WriteFailed("checkpoint 237 in /w/checkpoints", ValueError(TENSORSTORE_FULL_DISK))
  assert str(full.naming_the_checkpoint(158, "/w/checkpoints")) == (
      "no space left on device writing checkpoint 237 in /w/checkpoints; the checkpoint of "
      "step 158 is intact; free space and run the same command to resume")
  denied = WriteFailed("/w/preds", PermissionError(errno.EACCES, "Permission denied"))
  assert str(denied.naming_the_checkpoint(None, "/w/checkpoints")) == (
      "permission denied writing /w/preds; no checkpoint was written yet in /w/checkpoints; "
      "fix that and run the same command to start again")


def _tiny_state():
  return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "step": jnp.asarray(4, jnp.int32)}


def _read_only_file_system(monkeypatch):
  """os.access and os.statvfs as a read-only mount answers them."""
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  monkeypatch.setattr(os, "statvfs", lambda path: type("Stat", (), {"f_flag": os.ST_RDONLY}))


def test_a_folder_that_cannot_be_created_is_named_with_the_reason(tmp_path, monkeypatch):
  _read_only_file_system(monkeypatch)
  with pytest.raises(errors.FolderUnwritable) as raised:
    errors.check_writable_folder(tmp_path / "a" / "run", "--workdir")
  assert str(raised.value) == (f"--workdir {tmp_path / 'a' / 'run'}: cannot write there "
                               f"(read-only file system); choose a folder that can be written")
  assert raised.value.EXIT_STATUS == 74 and not (tmp_path / "a").exists()


def test_a_folder_whose_write_fails_after_the_check_is_the_same_line(tmp_path, monkeypatch):
  # The check passes (a writable parent), then the file system refuses: the lock's own mkdir.
  def refuse(self, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

  monkeypatch.setattr(Path, "mkdir", refuse)
  with pytest.raises(errors.FolderUnwritable, match=r"^--workdir .*/run: cannot write there "
                     r"\(read-only file system\); choose a folder that can be written$"):
    with workdir_lib.FolderLock(tmp_path / "run", workdir_lib.RUN_LOCK):
      pass


def test_a_lock_file_that_cannot_be_created_in_an_existing_folder_is_one_line(tmp_path,
                                                                              monkeypatch):
  real_open = os.open

  def refuse(path, *args, **kwargs):
    if str(path).endswith(workdir_lib.RUN_LOCK):
      raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(os, "open", refuse)
  with pytest.raises(errors.FolderUnwritable, match=r"cannot write there \(permission denied\)"):
    with workdir_lib.FolderLock(tmp_path, workdir_lib.RUN_LOCK):
      pass


def test_a_path_through_a_file_is_bad_input_not_a_write_failure(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(errors.UserError) as raised:
    errors.check_writable_folder(tmp_path / "file" / "run", "--workdir")
  assert not isinstance(raised.value, WriteFailed)
  assert str(raised.value) == (f"--workdir {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is "
                               f"not a folder")


def test_a_checkpoint_that_cannot_be_written_is_one_write_failure(tmp_path, monkeypatch):
  store = checkpoints.CheckpointStore(tmp_path / "checkpoints", max_to_keep=3)
  store.save(4, _tiny_state(), {"position": "after epoch 0"})

  def full_disk(*args, **kwargs):
    raise ValueError(TENSORSTORE_FULL_DISK)

  monkeypatch.setattr(store._manager, "save", full_disk)
  hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
  try:
    with pytest.raises(WriteFailed) as raised:
      with errors.naming_the_intact_checkpoint(store):
        store.save(8, _tiny_state(), {"position": "after epoch 1"})
    # The threads of a failed write wind down quietly: the hooks stay on the log.
    assert sys.excepthook is not hooks[0] and threading.excepthook is not hooks[1]
  finally:
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
    logging.getLogger("asyncio").setLevel(logging.NOTSET)
  assert str(raised.value) == (
      f"no space left on device writing checkpoint 8 in {tmp_path / 'checkpoints'}; the "
      f"checkpoint of step 4 is intact; free space and run the same command to resume")
  assert store.newest_intact == 4
  store.close()


def test_a_successful_save_leaves_the_error_hooks_as_they_were(tmp_path):
  hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
  store = checkpoints.CheckpointStore(tmp_path / "checkpoints", max_to_keep=3)
  store.save(4, _tiny_state(), {"position": "after epoch 0"})
  store.close()
  assert (sys.excepthook, threading.excepthook, sys.unraisablehook) == hooks


def test_unfinished_checkpoint_folders_are_removed_on_the_next_start(tmp_path, caplog):
  folder = tmp_path / "checkpoints"
  store = checkpoints.CheckpointStore(folder, max_to_keep=3)
  store.save(8, _tiny_state(), {"position": "after epoch 1"})
  store.close()
  unfinished = folder / f"12{checkpoints.UNFINISHED_SUFFIX}" / "state"
  unfinished.mkdir(parents=True)
  (unfinished / "half").write_bytes(b"\0" * 100)
  with caplog.at_level(logging.WARNING):
    store = checkpoints.CheckpointStore(folder, max_to_keep=3)
    state, record = store.restore_latest(_tiny_state(), (None,)) or (None, None)
    store.close()
  assert sorted(p.name for p in folder.iterdir()) == ["8"]
  assert record["position"] == "after epoch 1"
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _reporter(tmp_path):
  config = default_config.get_config()
  config.operations.tensorboard = False
  return built.reporter(config, workdir_lib.RunFiles(tmp_path))


def test_metrics_preds_and_config_that_cannot_be_written_name_their_file(tmp_path, monkeypatch):
  reporter = _reporter(tmp_path)
  reporter.start([], {})
  record = {"epoch": 0, "test_acc": 0.5}
  (tmp_path / "metrics.jsonl").unlink()
  (tmp_path / "metrics.jsonl").mkdir()  # a write there fails: EISDIR
  with pytest.raises(WriteFailed) as raised:
    reporter.epoch(record, step_time_ms=1.0, images_per_second=1.0)
  assert str(raised.value) == f"is a directory writing {tmp_path / 'metrics.jsonl'}"

  def full_disk(temporary, target):  # the temporary file is written, its rename fails
    raise OSError(errno.ENOSPC, "No space left on device", str(target))

  monkeypatch.setattr(Path, "replace", full_disk)
  with pytest.raises(WriteFailed) as raised:
    reporter.finish(np.zeros(4, np.int64), record)
  assert str(raised.value) == f"no space left on device writing {tmp_path / 'preds'}"
  assert not list(tmp_path.glob("preds*"))  # no temporary file is left behind
  with pytest.raises(WriteFailed, match="^no space left on device writing .*metrics.jsonl$"):
    reporter.start([], {})


_EPOCH_RECORD = {"epoch": 0, "train_loss": 0.7, "train_acc": 0.5, "test_loss": 0.7,
                 "test_acc": 0.5, "optim.learning_rate": 0.1}


def _reporter_whose_tensorboard_writes(tmp_path, write_event) -> reporting.Reporter:
  """A started reporter whose tensorboardX writer thread (each event is written from a thread
  of its own) calls `write_event` for every event."""
  reporter = built.reporter(default_config.get_config(), workdir_lib.RunFiles(tmp_path))
  reporter.start([], {})
  reporter._tensorboard._get_file_writer().event_writer._ev_writer.write_event = write_event
  return reporter


def _report_epochs(reporter, epochs, pause_seconds: float = 0.0) -> None:
  for epoch in epochs:
    reporter.epoch(dict(_EPOCH_RECORD, epoch=epoch), step_time_ms=1.0, images_per_second=1.0)
    time.sleep(pause_seconds)


def _full_disk(event):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_tensorboard_events_that_cannot_be_written_are_one_write_failure(tmp_path, capsys):
  hook = threading.excepthook
  reporter = _reporter_whose_tensorboard_writes(tmp_path, _full_disk)
  with pytest.raises(WriteFailed) as raised:  # at the epoch that finds the thread's failure
    _report_epochs(reporter, range(200), pause_seconds=0.05)
  assert str(raised.value) == f"no space left on device writing {tmp_path / 'tensorboard'}"
  reporter.close()
  assert threading.excepthook is hook
  assert "Traceback" not in capsys.readouterr().err


def test_tensorboard_writes_queue_behind_a_stuck_writer_instead_of_blocking(tmp_path):
  # tensorboardX's queue held 10 events: with its writer thread stuck (or dead before the run
  # saw its failure), the next epochs' scalars blocked the run forever.
  released = threading.Event()

  def stuck_then_full(event):
    released.wait()
    _full_disk(event)

  reporter = _reporter_whose_tensorboard_writes(tmp_path, stuck_then_full)
  _report_epochs(reporter, range(3))  # 3 x 7 scalars queued behind the stuck writer
  released.set()
  with pytest.raises(WriteFailed, match="^no space left on device writing .*tensorboard$"):
    _report_epochs(reporter, range(3, 200), pause_seconds=0.05)
  reporter.close()


class _FullDisk(io.StringIO):
  def write(self, text):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_log_that_cannot_be_written_stops_with_one_warning_at_the_end(tmp_path, capsys):
  with logs.log_file(tmp_path / "log.txt"):
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, logs._LogFile))
    handler.stream = _FullDisk()
    for index in range(5):
      logging.getLogger("convnet_jax.test").info("record %d", index)
  stderr = capsys.readouterr().err
  assert "Traceback" not in stderr and "Logging error" not in stderr
  assert stderr.splitlines() == [
      f"warning: the log {tmp_path / 'log.txt'} could not be written ([Errno 28] No space left "
      f"on device); it stops at that record"]


def test_a_run_that_ends_for_a_failed_write_leaves_the_log_to_its_own_line(tmp_path, capsys):
  with pytest.raises(WriteFailed):
    with logs.log_file(tmp_path / "log.txt"):
      handler = next(h for h in logging.getLogger().handlers if isinstance(h, logs._LogFile))
      handler.stream = _FullDisk()
      logging.getLogger("convnet_jax.test").info("a record")
      raise WriteFailed("/w/preds", OSError(errno.ENOSPC, "No space left on device"))
  assert capsys.readouterr().err == ""


def test_a_compilation_cache_that_cannot_be_written_warns_once(tmp_path, caplog):
  choice = compile_cache.CacheChoice(folder=tmp_path / "never-warned-before", source="test")
  message = ("Error writing persistent compilation cache entry for 'jit_{name}': OSError: "
             "[Errno 28] No space left on device")
  with caplog.at_level(logging.WARNING), compile_cache.Watch(choice):
    for name in ("train", "evaluate", "init"):
      warnings.warn(message.format(name=name))
  warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert warned == [f"compilation cache {tmp_path / 'never-warned-before'} could not be "
                    f"written (no space left on device); the run goes on without storing its "
                    f"programs"]


# ---------------------------------------------------------------------------------------------
# A finished run started again.

def _write_finished(files, num_epochs, tta=False):
  files.workdir.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({"epoch": e, "test_acc": 0.5 + e / 10}) for e in range(num_epochs)]
  if tta:
    lines[-1] = json.dumps({"epoch": num_epochs - 1, "test_acc": 0.9, "tta_test_acc": 0.925})
  files.metrics.write_text("".join(line + "\n" for line in lines))
  files.predictions.write_text("0\n1\n")
  return lines


def test_a_finished_run_is_every_epoch_line_and_the_predictions(tmp_path):
  files = workdir_lib.RunFiles(tmp_path / "run")
  lines = _write_finished(files, 3)
  assert workdir_lib.finished_run(files, 3) == lines
  assert workdir_lib.finished_run(files, 4) is None  # one epoch short
  files.predictions.unlink()  # killed after its last checkpoint, before `preds`
  assert workdir_lib.finished_run(files, 3) is None


def test_the_line_of_a_finished_run_says_epochs_accuracy_and_where():
  assert reporting.finished_run_line({"epoch": 4, "test_acc": 0.9675}, "/w") == (
      "run complete: 5 epochs, final test accuracy 0.9675; its files are in /w (metrics.jsonl, "
      "preds, checkpoints/); nothing was run again")
  assert reporting.finished_run_line(
      {"epoch": 9, "test_acc": 0.9338, "tta_test_acc": 0.9405}, "/w").startswith(
          "run complete: 10 epochs, final test accuracy 0.9338 (0.9405 with test-time "
          "augmentation); ")
  replicas = reporting.finished_run_line({"epoch": 0, "test_acc": [0.5, None, 0.7]}, "/w")
  assert "final test accuracy mean 0.6000 over 2 replicas;" in replicas


# ---------------------------------------------------------------------------------------------
# A batch that does not fit.

def test_out_of_memory_names_the_batch_size_key_model_and_dtype():
  config = default_config.get_config()
  config.batch_size = 25_000
  subject = prepare.model_subject(config)
  error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating "
                                     "180627953848 bytes.")
  with pytest.raises(OutOfMemory) as raised:
    with errors.naming_the_batch_size("batch_size", config.batch_size, subject):
      raise error
  # 180,627,953,848 bytes / 2**30 = 168.22 GiB.
  assert str(raised.value) == (
      f"config.batch_size=25000: out of memory in a training step of model seed_convnet in "
      f"float32: XLA could not allocate 168.2 GiB on {jax.devices()[0].platform}; lower "
      f"batch_size")
  with pytest.raises(OutOfMemory, match=r"^config\.eval\.batch_size=128: .* lower "
                                        r"eval\.batch_size$"):
    with errors.naming_the_batch_size("eval.batch_size", config.eval.batch_size, subject):
      raise error
  config.replicas.count = 4
  with pytest.raises(OutOfMemory, match=r"of model seed_convnet in float32 \(4 replicas\): "):
    with errors.naming_the_batch_size("batch_size", 128, prepare.model_subject(config)):
      raise error
  with pytest.raises(jax.errors.JaxRuntimeError):  # any other XLA error goes on as it is
    with errors.naming_the_batch_size("eval.batch_size", 128, subject):
      raise jax.errors.JaxRuntimeError("INTERNAL: something else")


# ---------------------------------------------------------------------------------------------
# A lost peer process, with a key-value store in place of JAX's coordination service.

class _KeyValueStore:
  def __init__(self):
    self.values, self.lock, self.down = {}, threading.Lock(), False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
    with self.lock:
      self.values[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
    with self.lock:
      return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


@pytest.fixture
def two_processes(monkeypatch):
  """This process as process `me` of two, its lost() recorded instead of ending the process."""
  def arrange(me):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: me)
    store = _KeyValueStore()
    monkeypatch.setattr(processes, "_distributed_client", lambda: store)
    ended = []

    monkeypatch.setattr(os, "_exit", ended.append)  # the watch goes on; the test stops it
    return store, ended

  return arrange


def _run_watch(watch, seconds, ended):
  """Runs the watch until it ends the process (`ended`) or for `seconds`."""
  watch.__enter__()
  deadline = time.monotonic() + seconds
  while not ended and time.monotonic() < deadline:
    time.sleep(0.01)
  watch._stop.set()
  watch._thread.join()


def test_a_peer_that_stops_counting_is_named_as_lost(two_processes, capsys):
  store, ended = two_processes(me=0)
  store.values[processes.PeerWatch.KEY + "1"] = "7"  # process 1 counted to 7, then died
  _run_watch(processes.PeerWatch(timeout_seconds=0.3, workdir="/w", interval=0.05), 5, ended)
  assert ended[0] == processes.PEER_LOST_EXIT_STATUS
  assert capsys.readouterr().err.splitlines()[0] == (
      "error: process 1 of this 2-process run was lost (no sign of life for 0.3 s); process 0 "
      "stops too. The checkpoints in /w are intact: start every process again with the same "
      "command to resume")


def test_a_peer_that_finished_is_not_lost_and_a_counting_one_neither(two_processes):
  store, ended = two_processes(me=0)
  store.values[processes.PeerWatch.KEY + "1"] = "done"
  _run_watch(processes.PeerWatch(timeout_seconds=0.2, workdir="/w", interval=0.05), 0.6, ended)
  assert ended == []

  # A peer counting every 50 ms, watched for 3 s against a 1 s timeout: only a stall of a
  # whole second (not a loaded machine's scheduling) could make it look lost.
  store, ended = two_processes(me=1)
  watch = processes.PeerWatch(timeout_seconds=1.0, workdir="/w", interval=0.05)
  alive = threading.Event()

  def peer_counts():  # process 0, alive: counts up every 50 ms
    count = 0
    while not alive.wait(0.05):
      count += 1
      store.key_value_set(processes.PeerWatch.KEY + "0", str(count))

  peer = threading.Thread(target=peer_counts)
  peer.start()
  _run_watch(watch, 3.0, ended)
  alive.set()
  peer.join()
  assert ended == []


def test_a_coordinator_that_no_longer_answers_is_named(two_processes, capsys):
  store, ended = two_processes(me=1)
  store.down = True
  _run_watch(processes.PeerWatch(timeout_seconds=0.2, workdir="/w", interval=0.05), 5, ended)
  assert ended[0] == processes.PEER_LOST_EXIT_STATUS
  assert capsys.readouterr().err.startswith(
      "error: the coordinator (process 0) of this 2-process run was lost (UNAVAILABLE: failed "
      "to connect to all addresses); process 1 stops too.")


def test_a_process_that_ends_marks_itself_done_or_failed(two_processes):
  store, _ = two_processes(me=1)
  with processes.PeerWatch(timeout_seconds=60, workdir="/w", interval=0.05):
    pass
  assert store.values[processes.PeerWatch.KEY + "1"] == "done"
  # Every process stops at the same step on a signal: the others are not to be stopped.
  with pytest.raises(RunStopped):
    with processes.PeerWatch(timeout_seconds=60, workdir="/w", interval=0.05):
      raise RunStopped("stopped by SIGTERM", 143)
  assert store.values[processes.PeerWatch.KEY + "1"] == "done"
  with pytest.raises(KeyError):
    with processes.PeerWatch(timeout_seconds=60, workdir="/w", interval=0.05):
      raise KeyError("a bug")
  assert store.values[processes.PeerWatch.KEY + "1"] == "failed"


def test_a_peer_that_failed_is_named_after_a_grace_for_this_processs_own_error(two_processes,
                                                                              capsys):
  store, ended = two_processes(me=0)
  store.values[processes.PeerWatch.KEY + "1"] = "failed"
  start = time.monotonic()
  _run_watch(processes.PeerWatch(timeout_seconds=0.3, workdir="/w", interval=0.05), 5, ended)
  assert ended[0] == processes.PEER_LOST_EXIT_STATUS
  assert time.monotonic() - start >= 0.3  # the grace: min(timeout, 5 s)
  assert capsys.readouterr().err.startswith(
      "error: process 1 of this 2-process run was lost (it stopped with an error of its own)")


def test_the_watch_and_the_main_thread_never_both_print_a_line(two_processes, capsys,
                                                                 monkeypatch):
  """The main thread's fallback (a collective that failed, a slow watch) and the watch can call
  `lost` at once: the first one's line ends the process, the second never prints."""
  two_processes(me=0)
  process_ended = threading.Event()

  def end_the_process(status):  # as os._exit: never returns while the process still runs
    print(f"exit {status}", file=sys.stderr, flush=True)
    process_ended.wait()

  monkeypatch.setattr(os, "_exit", end_the_process)
  watch = processes.PeerWatch(timeout_seconds=10, workdir="/w")
  callers = [threading.Thread(target=watch.lost, args=(who, "why"))
             for who in ("process 1", "a peer process")]
  for caller in callers:
    caller.start()
  time.sleep(0.5)  # long enough for the second caller to print, were it not held back
  lines = capsys.readouterr().err.splitlines()
  process_ended.set()
  for caller in callers:
    caller.join()
  assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1] == "exit 75", lines


def test_one_process_watches_nothing(monkeypatch):
  monkeypatch.setattr(processes, "_distributed_client", lambda: pytest.fail("no client needed"))
  with processes.PeerWatch(timeout_seconds=1, workdir="/w") as watch:
    assert watch._thread is None


# ---------------------------------------------------------------------------------------------
# A sweep database that goes away, with a storage whose calls fail as a stopped server's do.

def _refused():
  return sqlalchemy.exc.OperationalError(
      "SELECT 1", {}, ConnectionRefusedError("connection refused"))


class _FlakyStorage:
  """A storage method through `sweep_study._retrying`, failing as told before it answers."""

  def __init__(self, failures, retry_seconds=30.0):
    self._outage = sweep_study._Outage("'postgresql://db'", retry_seconds)
    self.failures, self.calls = list(failures), 0

  def answer(self):
    self.calls += 1
    if self.failures:
      raise self.failures.pop(0)
    return "the answer"


def _retried(name):
  return sweep_study._retrying(_FlakyStorage.answer, name)


def test_a_database_back_within_the_limit_is_two_lines_and_the_answer(monkeypatch, capsys):
  monkeypatch.setattr(sweep_study.time, "sleep", lambda seconds: None)
  storage = _FlakyStorage([_refused(), _refused(),
                           optuna.exceptions.StorageInternalError("commit")])
  storage.failures[2].__cause__ = _refused()  # optuna wraps the driver's error on commit
  assert _retried("get_all_trials")(storage) == "the answer"
  assert storage.calls == 4
  lines = capsys.readouterr().err.splitlines()
  assert lines[0] == ("sweep.storage='postgresql://db': the database cannot be reached "
                      "(ConnectionRefusedError: connection refused); retrying for up to 30 s")
  assert lines[1].startswith("sweep.storage='postgresql://db': reachable again after ")
  assert len(lines) == 2


def test_other_database_errors_are_not_retried(capsys):
  storage = _FlakyStorage([sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("dup"))])
  with pytest.raises(sqlalchemy.exc.IntegrityError):
    _retried("create_new_trial")(storage)
  assert storage.calls == 1 and capsys.readouterr().err == ""


def test_past_the_limit_the_worker_gives_up_and_later_calls_fail_at_once(capsys):
  storage = _FlakyStorage([_refused()] * 3, retry_seconds=0)
  with pytest.raises(StorageUnavailable) as raised:
    _retried("get_all_trials")(storage)
  assert str(raised.value) == (
      "sweep.storage='postgresql://db': the database could not be reached for 0 s "
      "(sweep.storage_retry_seconds); this worker stops. Its trial in flight stays RUNNING in "
      "the study and is resumed from its checkpoint when the sweep is started again once the "
      "database is back")
  with pytest.raises(StorageUnavailable):
    _retried("set_trial_user_attr")(storage)
  assert storage.calls == 1  # given up: no more tries


def test_a_heartbeat_past_the_limit_asks_the_trial_to_stop():
  storage = _FlakyStorage([_refused()], retry_seconds=0)
  with stopping.StopSignals() as signals:
    assert _retried("record_heartbeat")(storage) is None  # optuna's thread lives on
    assert signals.received == stopping.signal.SIGTERM
  assert not stopping.request_stop()  # no run in progress


def test_the_retrying_storage_works_as_optunas_own(tmp_path):
  storage = sweep_study.RetryingRDBStorage(f"sqlite:///{tmp_path / 'sweep.db'}",
                                           retry_seconds=5, where="'sqlite'")
  study = optuna.create_study(storage=storage, study_name="s")
  study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=3)
  assert len(study.trials) == 3 and storage._outage.since is None


# ---------------------------------------------------------------------------------------------
# The real thing, in subprocesses on real CIFAR-10.

def _main(cifar10_dir, workdir, *extra, preexec_fn=None, timeout=600):
  return subprocess.run(
      [sys.executable, "-m", "convnet_jax.main", "--config", "configs/smoke.py",
       f"--config.data.dir={cifar10_dir}", f"--workdir={workdir}", *extra],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def _files(folder: Path) -> dict:
  return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
          for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_finished_run_started_again_says_so_and_repeats_its_last_line(cifar10_dir, tmp_path):
  first = _main(cifar10_dir, tmp_path / "run", "--config.num_epochs=2")
  assert first.returncode == 0, first.stderr[-3000:]
  before = _files(tmp_path / "run")
  again = _main(cifar10_dir, tmp_path / "run", "--config.num_epochs=2")
  assert again.returncode == 0, again.stderr[-3000:]
  last = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
  assert again.stdout == last + "\n" == first.stdout.splitlines(keepends=True)[-1]
  accuracy = json.loads(last)["test_acc"]
  assert again.stderr == (
      f"run complete: 2 epochs, final test accuracy {accuracy:.4f}; its files are in "
      f"{tmp_path / 'run'} (metrics.jsonl, preds, checkpoints/); nothing was run again\n")
  assert _files(tmp_path / "run") == before  # not a byte or a time stamp changed


def _mount_tmpfs(folder: Path, size: str, read_only: bool = False) -> str | None:
  """Mounts a tmpfs of `size` at `folder` (`read_only`: mounted read-only); the reason when this
  machine does not allow it."""
  folder.mkdir(parents=True)
  if shutil.which("mount") is None:
    return "no mount command"
  options = f"size={size}" + (",ro" if read_only else "")
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
  return None if result.returncode == 0 else f"mount refused: {result.stderr.strip()}"


@pytest.fixture
def read_only_folder(tmp_path):
  """A folder on a read-only tmpfs, unmounted after the test."""
  folder = tmp_path / "read-only"
  refused = _mount_tmpfs(folder, "1m", read_only=True)
  if refused:
    pytest.skip(f"a real read-only folder needs a tmpfs, and {refused}; the unit tests of "
                f"errors.check_writable_folder inject the error instead")
  yield folder
  subprocess.run(["umount", str(folder)], check=False)


READ_ONLY_LINE = ("error: {who} {folder}: cannot write there (read-only file system); {advice}")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convnet_jax.main", "convnet_jax.benchmark",
                                     "convnet_jax.sweep"])
def test_a_workdir_on_a_read_only_file_system_is_one_line_before_any_work(
    command, cifar10_dir, read_only_folder):
  config = "configs/sweep_lr.py" if command == "convnet_jax.sweep" else "configs/smoke.py"
  data_key = "base.data.dir" if command == "convnet_jax.sweep" else "data.dir"
  workdir = read_only_folder / "run"
  result = subprocess.run(
      [sys.executable, "-m", command, "--config", config, f"--config.{data_key}={cifar10_dir}",
       f"--workdir={workdir}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == WriteFailed.EXIT_STATUS, result.stderr[-3000:]
  # Nothing before it: no data loaded, nothing compiled, no start-up line.
  assert result.stderr.splitlines() == [READ_ONLY_LINE.format(
      who="--workdir", folder=workdir, advice="choose a folder that can be written")]
  assert result.stdout == ""


@pytest.mark.slow
def test_a_data_cache_on_a_read_only_file_system_is_one_line_before_any_download(
    read_only_folder, tmp_path):
  env = {key: value for key, value in os.environ.items() if key != "CONVNET_JAX_DATA_DIR"}
  result = subprocess.run(
      [sys.executable, "-m", "convnet_jax.main", "--config", "configs/smoke.py",
       "--config.data.url=http://127.0.0.1:9/never-asked", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO_ROOT, env=dict(env, XDG_CACHE_HOME=str(read_only_folder)), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == WriteFailed.EXIT_STATUS, result.stderr[-3000:]
  assert result.stderr.splitlines() == [READ_ONLY_LINE.format(
      who="the data cache", folder=read_only_folder / "convnet_jax" / "cifar10",
      advice="set config.data.dir (or $CONVNET_JAX_DATA_DIR) to a folder with the CIFAR-10 "
             "binary files, or XDG_CACHE_HOME to a folder that can be written")]
  assert not (tmp_path / "run").exists()  # the empty workdir the run locked is removed again


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_moved_workdir_resumes_identically(cifar10_dir,
                                                                           tmp_path):
  small = tmp_path / "small"
  refused = _mount_tmpfs(small, "2m")
  if refused:
    pytest.skip(f"a real full disk needs a small tmpfs, and {refused}; the unit tests above "
                f"inject the error instead")
  try:
    # 4 epochs of the seed net: a checkpoint is ~0.9 MB, so the third does not fit in 2 MiB.
    args = ("--config.num_epochs=4", "--config.operations.compilation_cache=off")
    full = _main(cifar10_dir, small / "run", *args)
    moved = tmp_path / "moved"
    shutil.copytree(small / "run", moved)
  finally:
    subprocess.run(["umount", str(small)], check=False)
  lines = full.stderr.splitlines()
  assert full.returncode == WriteFailed.EXIT_STATUS, full.stderr[-3000:]
  assert "Traceback" not in full.stderr
  # The start-up lines, then the fault's one line.
  assert [line.split(" ")[0] for line in lines[:3]] == ["convolutions:", "model", "compile"]
  assert lines[3:] == [
      f"error: no space left on device writing checkpoint 12 in {small / 'run' / 'checkpoints'}; "
      f"the checkpoint of step 8 is intact; free space and run the same command to resume"]
  assert [json.loads(line)["epoch"] for line in full.stdout.splitlines()] == [0, 1]

  resumed = _main(cifar10_dir, moved, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming after epoch 1" in resumed.stderr
  assert "orbax-checkpoint-tmp" not in resumed.stderr and "warning" not in resumed.stderr.lower()
  assert not list((moved / "checkpoints").glob(f"*{checkpoints.UNFINISHED_SUFFIX}*"))
  uninterrupted = _main(cifar10_dir, tmp_path / "uninterrupted", *args)
  assert uninterrupted.returncode == 0
  reference = tmp_path / "uninterrupted"
  assert (moved / "preds").read_bytes() == (reference / "preds").read_bytes()
  assert [json.loads(line)["test_loss"] for line in (moved / "metrics.jsonl").open()] == [
      json.loads(line)["test_loss"] for line in (reference / "metrics.jsonl").open()]


# `python -m convnet_jax.main` in a process whose address space is capped first: XLA asks for
# the whole step's buffer at once (168 GiB here), which fails at once, and the cap only makes
# sure that nothing the test starts can take the 24 GiB machine down. (Set in the child itself:
# a preexec_fn would fork this process, which runs JAX's threads.)
LIMITED_MAIN = ("import resource, runpy, sys; limit = 20 * 2**30; "
                "resource.setrlimit(resource.RLIMIT_AS, (limit, limit)); "
                "sys.argv[0] = 'convnet_jax.main'; "
                "runpy.run_module('convnet_jax.main', run_name='__main__', alter_sys=True)")


@pytest.mark.slow
def test_a_batch_that_does_not_fit_is_one_line_naming_batch_size(cifar10_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-c", LIMITED_MAIN, "--config", "configs/cifar10_resnet18.py",
       f"--config.data.dir={cifar10_dir}", f"--workdir={tmp_path / 'run'}",
       "--config.batch_size=25000", "--config.operations.tensorboard=False"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.splitlines()[-1]
  assert last.startswith("error: config.batch_size=25000: out of memory in a training step of "
                         "model resnet18 in float32: XLA could not allocate ")
  assert last.endswith(" GiB on cpu; lower batch_size")
  assert not (tmp_path / "run" / "preds").exists()
