"""The processes of a multi-process run (`jax.distributed`): joining them, and stopping every one
in one line when one of them is lost (`PeerWatch`)."""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

from convnet_jax.errors import one_line
from convnet_jax.errors import RunStopped
from convnet_jax.errors import TrainingDiverged


# The exit status of a process that stops because another process of its run was lost
# (sysexits' EX_TEMPFAIL: start the run again).
PEER_LOST_EXIT_STATUS = 75


def initialize_processes(coordinator_address: str | None, num_processes: int | None,
                         process_id: int | None, timeout_seconds: int) -> None:
  """`jax.distributed.initialize`, with the shutdown timeout (how long a finished process waits
  for the others) at `timeout_seconds`, and JAX's own heartbeat timeout a minute past it: that
  is the backstop where a `PeerWatch` cannot act, and JAX then aborts with a stack dump, so it
  must not race the watch's one line on a loaded machine (a CI run once saw JAX's abort win
  at twice the watch's timeout)."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=max(2 * timeout_seconds,
                                                           timeout_seconds + 60),
                             shutdown_timeout_seconds=timeout_seconds)


class PeerWatch:
  """Watches the other processes of a multi-process run (a context, entered around the run).

  Left alone, the survivors of a lost process (killed, preempted) block in their next
  collective until JAX's coordination service misses its heartbeats, and then JAX aborts them
  with a stack dump. Here each process counts up a key of its own in the coordination
  service's key-value store every `interval` s, and a thread watches the others' counts: one
  that has not moved for `timeout_seconds` (measured on this machine's clock), a coordinator
  that no longer answers, or a collective that fails for a closed connection ends this process
  with one line naming the lost process and `PEER_LOST_EXIT_STATUS`, leaving every checkpoint
  as it is (each whole, or an unfinished temporary folder that the next start removes). A
  process that ends its run marks its key "done" (also after a stop on a signal or a diverged
  loss, which every process meets at the same step), so a peer still writing its last files is
  not taken for lost; one that ends with any other error marks it "failed", and the others stop
  a few seconds later unless their own error comes first. Does nothing in a one-process run.
  """

  KEY = "convnet_jax/alive/"

  def __init__(self, timeout_seconds: float, workdir, interval: float = 1.0):
    self._timeout, self._workdir, self._interval = timeout_seconds, workdir, interval
    self._client = _distributed_client() if jax.process_count() > 1 else None
    self._stop = threading.Event()
    self._thread = None
    # Held by the one thread that ends the process, so the watch and the main thread never
    # both print their line (they can meet: the main thread's fallback below, on a slow watch).
    self._ending = threading.Lock()

  def __enter__(self) -> PeerWatch:
    if self._client is not None:
      self._thread = threading.Thread(target=self._watch, name="convnet_jax-peer-watch",
                                      daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._thread is None:
      return
    if exc is not None and _lost_connection(exc):
      # The watch names the lost process about a timeout after it stopped; failing that (a
      # loaded machine can hold the watch's calls up for seconds), gloo's words do.
      self._thread.join(2 * self._timeout + 5 * self._interval)
      self.lost("a peer process", one_line(exc, 200))
    self._stop.set()
    self._thread.join()
    # A stop on a signal and a diverged loss end every process at the same step, as a run that
    # finished does; any other error may be this process's alone.
    ended_together = exc is None or isinstance(exc, (RunStopped, TrainingDiverged))
    self._mark("done" if ended_together else "failed")

  def _mark(self, value: str) -> None:
    try:
      self._client.key_value_set(f"{self.KEY}{jax.process_index()}", value,
                                 allow_overwrite=True)
    except Exception:  # the coordinator is gone: nobody is left to tell
      pass

  def _watch(self) -> None:
    me, others = jax.process_index(), [i for i in range(jax.process_count())
                                       if i != jax.process_index()]
    start = time.monotonic()
    seen = {peer: (None, start) for peer in others}  # last count, when it last moved
    # A peer's error is often every process's (an out-of-memory batch): let this process's
    # own line come first, if it is about to.
    failed_grace = min(self._timeout, 5.0)
    count, unreachable_since = 0, None
    while not self._stop.wait(self._interval):
      now = time.monotonic()
      try:
        count += 1
        self._client.key_value_set(f"{self.KEY}{me}", str(count), allow_overwrite=True)
        values = dict(self._client.key_value_dir_get(self.KEY))
        unreachable_since = None
      except Exception as error:  # the coordination service (in process 0) does not answer
        unreachable_since = unreachable_since or now
        if me != 0 and now - unreachable_since > self._timeout / 2:
          self.lost("the coordinator (process 0)", one_line(error, 200))
        if me == 0 and now - unreachable_since > self._timeout:  # its own service has failed
          self.lost("a peer process", one_line(error, 200))
        continue
      for peer in others:
        value = values.get(f"{self.KEY}{peer}")
        if value == "failed" and seen[peer][0] == "failed":
          if now - seen[peer][1] > failed_grace:
            self.lost(f"process {peer}", "it stopped with an error of its own")
        elif value != seen[peer][0]:
          seen[peer] = (value, now)
      stale = [peer for peer in others if seen[peer][0] != "done"
               and now - seen[peer][1] > self._timeout]
      if stale:
        self.lost(("process " if len(stale) == 1 else "processes ")
                  + ", ".join(map(str, stale)), f"no sign of life for {self._timeout:g} s")

  def lost(self, who: str, why: str) -> None:
    """Ends this process: one line naming the lost process, then `PEER_LOST_EXIT_STATUS`. A
    second thread calling it while the first ends the process waits for that end."""
    with self._ending:
      print(f"error: {who} of this {jax.process_count()}-process run was lost ({why}); "
            f"process {jax.process_index()} stops too. The checkpoints in {self._workdir} are "
            f"intact: start every process again with the same command to resume",
            file=sys.stderr, flush=True)
      sys.stdout.flush()
      # The main thread may be blocked inside a collective, and JAX's exit would wait for the
      # lost process at its shutdown barrier: end here.
      os._exit(PEER_LOST_EXIT_STATUS)


def _distributed_client():
  """JAX's client of the coordination service (private, so guarded: None when this JAX keeps
  it elsewhere, and the run goes without a `PeerWatch`)."""
  try:
    from jax._src import distributed

    return distributed.global_state.client
  except (ImportError, AttributeError):
    return None


def _lost_connection(error: BaseException) -> bool:
  """Whether a collective failed because a peer's connection closed (gloo's words)."""
  text = str(error)
  return "Gloo" in text and ("closed by peer" in text or "Connection reset" in text
                             or "Connection refused" in text)


