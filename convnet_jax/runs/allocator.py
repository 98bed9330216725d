"""The C allocator of a command's process: glibc's malloc set to keep the memory it frees.

XLA's CPU runtime allocates the temporaries of each call of a compiled program with malloc and
frees them when the call returns: ~4 GB for airbench at batch 2,000. glibc serves a block that
large with a fresh `mmap` and returns it with `munmap`, so every call page-faults and zeroes
its temporaries again, in 4 KiB pages: measured on a 2-core Zen 5, one bfloat16
airbench94_muon step took 4.0-5.6 s as a call of its own and ~3.0 s with the settings below
(see docs/speed.md). The settings, as glibc tunables (read only when a process starts):

* `mmap_max=0`: no block gets an `mmap` of its own, so freed temporaries stay in the heap and
  the next call reuses them, already faulted in;
* `trim_threshold` (64 GiB): the heap is not given back to the system between calls;
* `hugetlb=1`: what is faulted in comes in transparent huge pages where the kernel's THP mode
  is `madvise` (the common default).

The cost: the process keeps its peak heap until it exits, which a training run does anyway.
"""

from __future__ import annotations

import os
import sys

TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=68719476736")
# "default" leaves glibc's own settings (and the process) alone.
OPT_OUT_VARIABLE = "CONVNET_JAX_MALLOC"


def _glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
    return False


def restart_with_tunables() -> None:
  """Restarts this process once, in place (`os.execv`: same pid, arguments and environment),
  with `TUNABLES` in its environment, when it runs on glibc and neither `GLIBC_TUNABLES` (the
  user's own choice, kept as it is) nor `CONVNET_JAX_MALLOC=default` is set. Processes it
  starts inherit the setting, so they do not restart. `cli.run` calls it first thing: the new
  process inherits the file descriptors as they are (a stdout moved before would stay moved)."""
  if (not untuned() or os.environ.get(OPT_OUT_VARIABLE, "") == "default"
      or not getattr(sys, "orig_argv", None)):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  environment = dict(os.environ, GLIBC_TUNABLES=TUNABLES)
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def untuned() -> bool:
  """Whether this process runs on glibc with its default malloc settings: neither restarted by
  `restart_with_tunables` nor given `GLIBC_TUNABLES` by the user."""
  return _glibc() and "GLIBC_TUNABLES" not in os.environ


def describe() -> str:
  """The start-up line on the allocator: "malloc: keeps freed memory, huge pages
  (GLIBC_TUNABLES=...)", or what else is in effect."""
  tunables = os.environ.get("GLIBC_TUNABLES")
  if tunables == TUNABLES:
    return f"malloc: keeps freed memory, huge pages (GLIBC_TUNABLES={tunables})"
  if tunables is not None:
    return f"malloc: GLIBC_TUNABLES={tunables} (the user's)"
  if not _glibc():
    return "malloc: the platform's own"
  return ("malloc: glibc defaults (each call faults its temporaries in again; run through "
          "a convnet_jax command or set GLIBC_TUNABLES, see convnet_jax/runs/allocator.py)")
