"""The commands' malloc settings (`runs.allocator`): the process restarts itself once, in
place, with glibc told to keep freed memory, and glibc then serves a large block from its heap
instead of an mmap of its own, which is what lets XLA's next call reuse its temporaries."""

import os
import subprocess
import sys

from conftest import REPO_ROOT
from convnet_jax.runs import allocator

# Prints its pid and GLIBC_TUNABLES before and after the restart, then where glibc put a 64 MiB
# malloc: glibc's default mmap threshold is at most 32 MiB, so by default such a block is an
# anonymous mapping of its own; with mmap_max=0 it must come from the [heap].
CHILD = """
import ctypes, os, sys
from convnet_jax.runs import allocator
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
allocator.restart_with_tunables()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
address = libc.malloc(64 << 20)
for line in open("/proc/self/maps"):
  fields = line.split()
  low, high = (int(bound, 16) for bound in fields[0].split("-"))
  if low <= address < high:
    print("block", fields[5] if len(fields) > 5 else "anonymous")
print("args", *sys.argv[1:])
"""


def _child(**environment):
  env = {key: value for key, value in os.environ.items()
         if key not in ("GLIBC_TUNABLES", allocator.OPT_OUT_VARIABLE)}
  result = subprocess.run([sys.executable, "-c", CHILD, "one", "--two=2"], cwd=REPO_ROOT,
                          env={**env, **environment}, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  return [line.split(" ") for line in result.stdout.splitlines()]


def test_restarts_once_in_place_and_glibc_then_serves_large_blocks_from_its_heap():
  lines = _child()
  assert [line[0] for line in lines] == ["start", "start", "block", "args"]
  (_, first_pid, first_tunables), (_, second_pid, second_tunables) = lines[:2]
  assert first_pid == second_pid  # exec, not a child process: signals still reach the run
  assert first_tunables == "None"
  assert second_tunables == allocator.TUNABLES
  assert lines[2] == ["block", "[heap]"]
  assert lines[3] == ["args", "one", "--two=2"]


def test_opting_out_leaves_glibc_as_it_is():
  lines = _child(CONVNET_JAX_MALLOC="default")
  assert [line[0] for line in lines] == ["start", "block", "args"]
  assert lines[1] == ["block", "anonymous"]  # glibc's default: its own mmap


def test_the_users_own_tunables_are_kept_and_named():
  lines = _child(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
  assert [line[0] for line in lines] == ["start", "block", "args"]
  assert lines[0][2] == "glibc.malloc.arena_max=2"
  assert lines[1] == ["block", "anonymous"]


def test_start_up_line_names_what_is_in_effect(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", allocator.TUNABLES)
  assert not allocator.untuned()
  assert allocator.describe().startswith("malloc: keeps freed memory, huge pages")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  assert allocator.describe() == "malloc: GLIBC_TUNABLES=glibc.malloc.arena_max=2 (the user's)"
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert allocator.untuned()
  assert allocator.describe().startswith("malloc: glibc defaults")
