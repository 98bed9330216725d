"""JAX's persistent compilation cache, on by default: a run loads the programs an earlier run
with the same shapes compiled, instead of compiling them again (~2-3 s of a 24 s seed run).
A run's training and evaluation programs are also kept whole (`ProgramStore`), so that a run
of the same config loads them without even tracing them (~1 s more).

Where: `operations.compilation_cache` ("" by default), else `$CONVNET_JAX_COMPILATION_CACHE`,
else `$XDG_CACHE_HOME/convnet_jax/xla` (~/.cache/...), beside the data cache; "off" (or "0",
"none", "false") in either turns it off. A cache folder set for JAX itself
(`JAX_COMPILATION_CACHE_DIR`) is left as the user set it.

Entries go into a subfolder named by what decides whether a compiled CPU program can run here:
the jaxlib version, the CPU (model and instruction-set flags: XLA compiles for the host's
features, and JAX's own cache key does not hold them), and the oneDNN extension's file and
library. A cache copied from another machine kind, or left by an older install, is never read:
its entries sit in another subfolder. XLA's loader checks the CPU features of an entry too
(it refuses one compiled for features this CPU lacks); the subfolder keeps that from coming up.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import warnings
from pathlib import Path
from typing import Callable

import jax
import jaxlib
from absl import logging

from convnet_jax.data import download
from convnet_jax.ops import onednn
from convnet_jax.errors import write_failure_reason

CACHE_VARIABLE = "CONVNET_JAX_COMPILATION_CACHE"
OFF_WORDS = ("off", "0", "none", "false")
# Bounded, least recently used entries go first; the bound also turns on JAX's file lock, so
# two processes (test workers, data-parallel processes of one host) can share the folder.
MAX_BYTES = 2 << 30
# Every program the run compiles is kept, even the ~0.1 s ones: a warm start then compiles
# nothing (JAX's default keeps only programs that took over 1 s).
MIN_COMPILE_SECONDS = 0.0


@dataclasses.dataclass(frozen=True)
class CacheChoice:
  """The cache folder in use (None: off) and where the setting came from."""
  folder: Path | None
  source: str


def _cpu_description() -> str:
  """The CPU's model name and flags (Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
      text = file.read()
  except OSError:
    return f"{platform.machine()} {platform.processor()}"
  fields = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key in ("model name", "flags", "Features", "CPU part") and key not in fields:
      fields[key] = " ".join(sorted(value.split()))
  return f"{platform.machine()} | " + " | ".join(f"{k}: {v}" for k, v in sorted(fields.items()))


def _file_digest(path: str | None) -> str:
  if not path or not os.path.isfile(path):
    return "none"
  return download.file_sha256(Path(path))


@functools.cache
def machine_key() -> str:
  """The subfolder name: jaxlib's version and a digest of the CPU and the oneDNN extension."""
  status = onednn.load()
  parts = [jaxlib.__version__, _cpu_description(), status.detail,
           _file_digest(onednn.extension_path())]
  digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
  return f"jaxlib-{jaxlib.__version__}-{digest}"


def default_root() -> Path:
  """$XDG_CACHE_HOME/convnet_jax/xla, or ~/.cache/convnet_jax/xla."""
  return download.user_cache_folder() / "xla"


def resolve(setting: str) -> CacheChoice:
  """Where the cache goes for `operations.compilation_cache` = `setting` (see the module)."""
  if setting:
    source = "operations.compilation_cache"
  elif os.environ.get(CACHE_VARIABLE):
    setting, source = os.environ[CACHE_VARIABLE], f"${CACHE_VARIABLE}"
  else:
    return CacheChoice(default_root() / machine_key(), "default")
  if setting.strip().lower() in OFF_WORDS:
    return CacheChoice(None, f"off by {source}")
  return CacheChoice(Path(setting).expanduser() / machine_key(), source)


def enable(setting: str) -> CacheChoice:
  """Points JAX's persistent compilation cache at the folder `resolve(setting)` names (or turns
  it off), before anything is compiled. The oneDNN targets are registered first, since a cached
  program that calls them can only be loaded after. Leaves a folder set through JAX's own
  `jax_compilation_cache_dir` (JAX_COMPILATION_CACHE_DIR) alone."""
  from jax.experimental.compilation_cache import compilation_cache

  onednn.load()
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return CacheChoice(Path(os.environ["JAX_COMPILATION_CACHE_DIR"]),
                       "$JAX_COMPILATION_CACHE_DIR")
  choice = resolve(setting)
  if choice.folder is not None:
    try:
      choice.folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a read-only home, say: the run goes on without a cache
      logging.warning("compilation cache off: cannot create %s (%s)", choice.folder, error)
      choice = CacheChoice(None, f"off: cannot create {choice.folder}")
  folder = str(choice.folder) if choice.folder else None
  if (jax.config.jax_compilation_cache_dir != folder
      or jax.config.jax_enable_compilation_cache != (folder is not None)):
    jax.config.update("jax_enable_compilation_cache", folder is not None)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    # JAX opens its cache once per process, so a new folder needs a fresh start.
    compilation_cache.reset_cache()
  return choice


# Compilations that asked the persistent cache, and those it answered, in this process
# (with `ProgramStore`'s loads, each one program that asked and was answered).
_events = {"requests": 0, "hits": 0}


@functools.cache
def _count_cache_events() -> None:
  def listener(event: str, **_):
    if event == "/jax/compilation_cache/compile_requests_use_cache":
      _events["requests"] += 1
    elif event == "/jax/compilation_cache/cache_hits":
      _events["hits"] += 1

  jax.monitoring.register_event_listener(listener)


# How JAX words an entry it could not read (it then compiles the program again).
_UNREADABLE = re.compile(r"Error reading persistent compilation cache entry for '([^']+)'")


# How JAX words an entry it could not write (it goes on with the program compiled).
_UNWRITABLE = re.compile(r"Error writing persistent compilation cache entry for '([^']+)'")
_unwritable_folders = set()  # warned about in this process


def _warn_once_unwritable(folder: Path, error: BaseException) -> None:
  """One warning per process and folder that the cache cannot be written: the run goes on."""
  if folder not in _unwritable_folders:
    _unwritable_folders.add(folder)
    logging.warning("compilation cache %s could not be written (%s); the run goes on without "
                    "storing its programs", folder, write_failure_reason(error))


class Watch:
  """Watches a run's compiles (a context). `finish()` says how many of the programs compiled
  since the start came from the cache. An entry JAX cannot read (one cut short by a process
  killed while writing it: JAX writes entries in place, and never replaces one) JAX compiles
  again; here that program's entries are removed at once, so that JAX writes a whole one, and
  at the end one warning names them, instead of JAX's warning per program and run."""

  def __init__(self, choice: CacheChoice):
    self._choice = choice
    self._unreadable = []
    self._show = None
    self._start = None
    self._summary = ""

  def __enter__(self):
    _count_cache_events()
    self._start = dict(_events)
    # `warnings.showwarning` is the hook the warnings module documents for replacing.
    self._show = warnings.showwarning
    warnings.showwarning = self._show_warning
    return self

  def _show_warning(self, message, category, filename, lineno, file=None, line=None):
    if self._choice.folder is not None and _UNWRITABLE.search(str(message)):
      _warn_once_unwritable(self._choice.folder, Exception(str(message)))
      return
    match = _UNREADABLE.search(str(message))
    if match is None or self._choice.folder is None:
      return self._show(message, category, filename, lineno, file, line)
    self._unreadable.append(match.group(1))
    for entry in self._choice.folder.glob(f"{match.group(1)}-*"):
      entry.unlink(missing_ok=True)

  def __exit__(self, *exc_info):
    self.finish()
    warnings.showwarning = self._show
    if self._unreadable:
      logging.warning("compilation cache %s: %d entries could not be read (%s); compiled "
                      "again and written anew", self._choice.folder, len(self._unreadable),
                      ", ".join(sorted(set(self._unreadable))))

  def finish(self) -> str:
    """"4 of 4 programs from the compilation cache" for the compiles since the start (the first
    call; later calls repeat it), or "" when nothing used the cache."""
    if self._start is not None:
      requests = _events["requests"] - self._start["requests"]
      hits = _events["hits"] - self._start["hits"]
      if requests and self._choice.folder is not None:
        self._summary = f"{hits} of {requests} programs from the compilation cache"
      self._start = None
    return self._summary


@functools.cache  # the package's files do not change while it runs
def _source_digest() -> str:
  """The package's own code (Python and C++ sources) and the versions of the libraries that
  trace its programs: a stored program is only reused by the code that traced it."""
  import importlib.metadata

  digest = hashlib.sha256()
  package = Path(__file__).parent
  for path in sorted(package.rglob("*.py")) + sorted(package.rglob("*.cc")):
    digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections"):
    try:
      digest.update(f"{name}={importlib.metadata.version(name)}".encode())
    except importlib.metadata.PackageNotFoundError:
      digest.update(f"{name}=none".encode())
  return digest.hexdigest()


# In a programs folder: this machine could not load the programs it stored (see ProgramStore).
UNLOADABLE = "UNLOADABLE"


def _load(path: Path, in_tree, out_tree):
  from jax.experimental import serialize_executable

  program = serialize_executable.deserialize_and_load(path.read_bytes(), in_tree, out_tree)
  os.utime(path)  # the newest use, for `ProgramStore._prune`
  return program


def _signature(tree) -> list[str]:
  """Shapes, dtypes and shardings of a tree of arrays (or ShapeDtypeStructs), in order."""
  return [f"{leaf.shape} {leaf.dtype} {getattr(leaf, 'sharding', None)}"
          for leaf in jax.tree_util.tree_leaves(tree)]


class ProgramStore:
  """Compiled programs kept whole in the cache folder (`programs/`), keyed by what defines
  them: the run's config (`identity`, its computation only), the package's code and library
  versions, the machine (the folder) and the arguments' shapes, dtypes and shardings. A hit
  skips tracing and lowering as well as compiling. Off without a cache folder and in
  multi-process runs (whose programs span other processes' devices); a program that cannot be
  stored, or an entry that cannot be loaded, falls back to compiling (JAX's cache then)."""

  KEEP = 32  # the newest entries kept; each is one program (~1 MB for the seed net's)

  def __init__(self, choice: CacheChoice, identity: dict):
    self._folder = None
    if choice.folder is not None and jax.process_count() == 1:
      self._folder = choice.folder / "programs"
      self._identity = json.dumps(identity, sort_keys=True, default=str) + _source_digest()

  def load_or_compile(self, name: str, arguments: tuple, outputs, compile_fn: Callable):
    """The program `compile_fn()` compiles for `arguments` (a tuple of the positional
    arguments, arrays or ShapeDtypeStructs), whose outputs have the tree structure of
    `outputs`: loaded when stored, else compiled and stored."""
    if self._folder is None or (self._folder / UNLOADABLE).exists():
      return compile_fn()
    key = hashlib.sha256("\n".join([self._identity, name] + _signature(arguments)).encode())
    path = self._folder / f"{name}-{key.hexdigest()[:32]}.bin"
    trees = (jax.tree_util.tree_structure((arguments, {})), jax.tree_util.tree_structure(outputs))
    failed = False
    if path.is_file():
      try:
        program = _load(path, *trees)
        _events["requests"] += 1  # counted as a program from the cache (`Watch`)
        _events["hits"] += 1
        return program
      except Exception as error:  # damaged, or refused by this machine: see below
        logging.warning("stored program %s could not be loaded (%s: %s); compiling it", path,
                        type(error).__name__, " ".join(str(error).split())[:200])
        failed = True
    hits = _events["hits"]
    program = compile_fn()
    if _events["hits"] > hits:
      # Loaded from JAX's cache: such an executable serializes without its compiled kernels (it
      # would fail when run, "Function ... not found"), so it is not stored. JAX's cache serves
      # the next run of this config too; what it compiles afresh is stored.
      return program
    if self._store(path, program) and failed:
      # An entry written just now that does not load either means this machine refuses the
      # programs it compiles itself (jax-ml/jax#38445): stop storing them here.
      try:
        _load(path, *trees)
      except Exception as error:
        (self._folder / UNLOADABLE).write_text(f"{type(error).__name__}: {error}\n")
        path.unlink(missing_ok=True)
        logging.warning("programs stored on this machine cannot be loaded back; no longer "
                        "storing them in %s", self._folder)
    return program

  def _store(self, path: Path, program) -> bool:
    from jax.experimental import serialize_executable

    try:
      payload, _, _ = serialize_executable.serialize(program)
    except (ValueError, NotImplementedError) as error:
      logging.info("program %s is not stored: %s", path.name, error)
      return False
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
      self._folder.mkdir(parents=True, exist_ok=True)
      temporary.write_bytes(payload)
      temporary.replace(path)  # a kill never leaves half an entry under the real name
      self._prune()
    except OSError as error:  # a full disk, say: the run goes on with the program in memory
      temporary.unlink(missing_ok=True)
      _warn_once_unwritable(self._folder.parent, error)
      self._folder = None  # stores no more in this run
      return False
    return True

  def _prune(self) -> None:
    entries = sorted(self._folder.glob("*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
    for entry in entries[self.KEEP:]:
      entry.unlink(missing_ok=True)
