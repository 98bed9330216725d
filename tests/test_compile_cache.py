"""The persistent compilation cache: where it goes, that another machine's entries are never
read, that unreadable entries heal, that whole programs are stored and loaded, and (slow) that a
second run of the same config loads every program instead of compiling it."""

import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from conftest import REPO_ROOT
from convnet_jax.ops import onednn
from convnet_jax.runs import compile_cache


@pytest.fixture
def fresh_machine_key():
  compile_cache.machine_key.cache_clear()
  yield
  compile_cache.machine_key.cache_clear()


def test_default_folder_is_per_user_and_per_machine(monkeypatch, tmp_path, fresh_machine_key):
  monkeypatch.delenv(compile_cache.CACHE_VARIABLE, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  choice = compile_cache.resolve("")
  assert choice.source == "default"
  assert choice.folder.parent == tmp_path / "convnet_jax" / "xla"
  name = choice.folder.name
  assert name.startswith(f"jaxlib-{jaxlib.__version__}-") and len(name.split("-")[-1]) == 16


@pytest.mark.parametrize("setting", ["off", "OFF", "0", "none", "false"])
def test_off_words_turn_it_off_from_the_config_or_the_environment(monkeypatch, setting):
  monkeypatch.delenv(compile_cache.CACHE_VARIABLE, raising=False)
  assert compile_cache.resolve(setting) == compile_cache.CacheChoice(
      None, "off by operations.compilation_cache")
  monkeypatch.setenv(compile_cache.CACHE_VARIABLE, setting)
  assert compile_cache.resolve("") == compile_cache.CacheChoice(
      None, f"off by ${compile_cache.CACHE_VARIABLE}")


def test_the_config_key_beats_the_environment_variable(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.CACHE_VARIABLE, str(tmp_path / "from-env"))
  assert compile_cache.resolve("").folder.parent == tmp_path / "from-env"
  choice = compile_cache.resolve(str(tmp_path / "from-config"))
  assert choice.folder.parent == tmp_path / "from-config"
  assert choice.source == "operations.compilation_cache"


def test_another_cpu_or_extension_gets_another_folder(monkeypatch, tmp_path, fresh_machine_key):
  """A cache copied from a machine with other CPU flags (XLA compiles for the host's), or left
  by another build of the oneDNN extension, sits in a subfolder this machine never reads."""
  here = compile_cache.machine_key()
  compile_cache.machine_key.cache_clear()
  monkeypatch.setattr(compile_cache, "_cpu_description",
                      lambda: "x86_64 | flags: avx avx2 avx512_bf16 avx512f | model name: other")
  other_cpu = compile_cache.machine_key()
  compile_cache.machine_key.cache_clear()
  monkeypatch.undo()
  extension = tmp_path / "other_build.so"
  extension.write_bytes(b"another build")
  monkeypatch.setattr(onednn, "extension_path", lambda: str(extension))
  other_extension = compile_cache.machine_key()
  assert len({here, other_cpu, other_extension}) == 3


def test_the_cpu_description_holds_the_instruction_set_flags():
  flags = set(open("/proc/cpuinfo").read().split())
  description = compile_cache._cpu_description()
  assert "avx2" in flags and " avx2 " in description + " "


def test_unreadable_entries_are_removed_and_named_once(tmp_path, caplog):
  for name in ("jit_add-1a-cache", "jit_add-1a-atime", "jit_add-2b-cache", "jit_mul-3c-cache"):
    (tmp_path / name).write_bytes(b"entry")
  with compile_cache.Watch(compile_cache.CacheChoice(tmp_path, "test")):
    warnings.warn("Error reading persistent compilation cache entry for 'jit_add': error: "
                  "Error -5 while decompressing data: incomplete or truncated stream")
    with pytest.warns(UserWarning, match="unrelated"):
      warnings.warn("unrelated")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["jit_mul-3c-cache"]
  messages = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
  assert messages == [f"compilation cache {tmp_path}: 1 entries could not be read (jit_add); "
                      f"compiled again and written anew"]


def _program(x):
  return x * 2.0 + 1.0


def test_a_stored_program_is_loaded_without_compiling(tmp_path):
  store = compile_cache.ProgramStore(compile_cache.CacheChoice(tmp_path, "test"), {"a": 1})
  argument = jax.ShapeDtypeStruct((3,), jnp.float32)
  compiles = []

  def compile_fn():
    compiles.append(1)
    return jax.jit(_program).lower(argument).compile()

  first = store.load_or_compile("double", (argument,), argument, compile_fn)
  second = store.load_or_compile("double", (argument,), argument, compile_fn)
  assert compiles == [1]
  x = np.asarray([0.5, -1.0, 3.0], np.float32)
  np.testing.assert_array_equal(np.asarray(second(x)), [2.0, -1.0, 7.0])
  np.testing.assert_array_equal(np.asarray(first(x)), [2.0, -1.0, 7.0])
  # Another config, or other shapes, is another program.
  other = compile_cache.ProgramStore(compile_cache.CacheChoice(tmp_path, "test"), {"a": 2})
  other.load_or_compile("double", (argument,), argument, compile_fn)
  wider = jax.ShapeDtypeStruct((4,), jnp.float32)
  store.load_or_compile("double", (wider,), wider,
                        lambda: compiles.append(1) or jax.jit(_program).lower(wider).compile())
  assert compiles == [1, 1, 1]
  assert len(list((tmp_path / "programs").glob("double-*.bin"))) == 3


def test_a_damaged_stored_program_is_compiled_and_stored_anew(tmp_path):
  store = compile_cache.ProgramStore(compile_cache.CacheChoice(tmp_path, "test"), {})
  argument = jax.ShapeDtypeStruct((2,), jnp.float32)
  compile_fn = lambda: jax.jit(_program).lower(argument).compile()  # noqa: E731
  store.load_or_compile("double", (argument,), argument, compile_fn)
  [entry] = (tmp_path / "programs").glob("*.bin")
  entry.write_bytes(entry.read_bytes()[:100])
  program = store.load_or_compile("double", (argument,), argument, compile_fn)
  np.testing.assert_array_equal(np.asarray(program(np.ones(2, np.float32))), [3.0, 3.0])
  assert entry.stat().st_size > 100  # stored whole again


def test_only_the_newest_programs_are_kept(tmp_path, monkeypatch):
  monkeypatch.setattr(compile_cache.ProgramStore, "KEEP", 2)
  store = compile_cache.ProgramStore(compile_cache.CacheChoice(tmp_path, "test"), {})
  for size in (1, 2, 3):
    argument = jax.ShapeDtypeStruct((size,), jnp.float32)
    store.load_or_compile("double", (argument,), argument,
                          lambda: jax.jit(_program).lower(argument).compile())
  assert len(list((tmp_path / "programs").glob("*.bin"))) == 2


def test_no_folder_means_no_store(tmp_path):
  store = compile_cache.ProgramStore(compile_cache.CacheChoice(None, "off"), {})
  argument = jax.ShapeDtypeStruct((2,), jnp.float32)
  store.load_or_compile("double", (argument,), argument,
                        lambda: jax.jit(_program).lower(argument).compile())
  assert not any(tmp_path.iterdir())


SMOKE = ("--config", "configs/smoke.py", "--config.operations.tensorboard=False")


def _smoke_run(cifar10_dir, workdir, cache, extra=()):
  result = subprocess.run(
      [sys.executable, "-m", "convnet_jax.main", *SMOKE, f"--config.data.dir={cifar10_dir}",
       f"--workdir={workdir}", f"--config.operations.compilation_cache={cache}", *extra],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  [compile_line] = [line for line in result.stderr.splitlines()
                    if line.startswith("compile time: ")]
  record = json.loads(result.stdout.splitlines()[0])
  return compile_line, {key: record[key] for key in ("train_loss", "test_loss", "test_acc")}, \
      result.stderr


@pytest.mark.slow
def test_a_second_run_loads_every_program_and_computes_the_same(cifar10_dir, tmp_path):
  cache = tmp_path / "cache"
  cold_line, cold, _ = _smoke_run(cifar10_dir, tmp_path / "cold", cache)
  # The initialisation, training and evaluation programs.
  assert cold_line.endswith("(0 of 3 programs from the compilation cache)")
  warm_line, warm, _ = _smoke_run(cifar10_dir, tmp_path / "warm", cache)
  # The training and evaluation programs whole, and the initialisation from JAX's cache.
  assert warm_line.endswith("(3 of 3 programs from the compilation cache)")
  assert warm == cold
  off_line, off, _ = _smoke_run(cifar10_dir, tmp_path / "off", "off")
  assert off_line.startswith("compile time: ") and "(" not in off_line
  assert off == cold
  # Every entry cut short, as a process killed while writing would leave it: the run computes
  # the same, says so once, and the next run finds whole entries again.
  for entry in cache.rglob("*"):
    if entry.is_file() and entry.name.endswith(("-cache", ".bin")):
      entry.write_bytes(entry.read_bytes()[:64])
  _, damaged, stderr = _smoke_run(cifar10_dir, tmp_path / "damaged", cache)
  assert damaged == cold
  assert len([line for line in stderr.splitlines() if "could not be read" in line]) == 1
  healed_line, healed, _ = _smoke_run(cifar10_dir, tmp_path / "healed", cache)
  assert healed_line.endswith("(3 of 3 programs from the compilation cache)")
  assert healed == cold
  # Another seed: the same programs in JAX's cache, but not stored whole for this config. JAX's
  # cache serves them, and they are not stored (an executable JAX loaded from its cache
  # serializes without its kernels), so every run computes what a run without the cache does.
  reseeded = ("--config.seed=1",)
  _, fresh, _ = _smoke_run(cifar10_dir, tmp_path / "seed1-off", "off", reseeded)
  stored = sorted(cache.rglob("*.bin"))
  for name in ("seed1-a", "seed1-b"):
    line, reseeded_run, _ = _smoke_run(cifar10_dir, tmp_path / name, cache, reseeded)
    assert line.endswith("(3 of 3 programs from the compilation cache)")  # all from JAX's
    assert reseeded_run == fresh != cold
  assert sorted(cache.rglob("*.bin")) == stored


def test_a_machine_that_refuses_its_own_programs_stops_storing_them(tmp_path, monkeypatch):
  """As XLA does on CPUs where it takes a tuning flag for a missing feature (jax#38445)."""
  store = compile_cache.ProgramStore(compile_cache.CacheChoice(tmp_path, "test"), {})
  argument = jax.ShapeDtypeStruct((2,), jnp.float32)
  compile_fn = lambda: jax.jit(_program).lower(argument).compile()  # noqa: E731
  store.load_or_compile("double", (argument,), argument, compile_fn)

  def refuse(*_):
    raise RuntimeError("Target machine feature +prefer-no-gather is not supported")

  monkeypatch.setattr(compile_cache, "_load", refuse)
  program = store.load_or_compile("double", (argument,), argument, compile_fn)
  np.testing.assert_array_equal(np.asarray(program(np.ones(2, np.float32))), [3.0, 3.0])
  assert (tmp_path / "programs" / compile_cache.UNLOADABLE).is_file()
  assert not list((tmp_path / "programs").glob("*.bin"))
  compiles = []
  store.load_or_compile("double", (argument,), argument,
                        lambda: compiles.append(1) or compile_fn())
  assert compiles == [1] and not list((tmp_path / "programs").glob("*.bin"))


def test_a_folder_that_cannot_be_created_leaves_the_cache_off(tmp_path, caplog):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a folder")
  choice = compile_cache.resolve(str(blocker / "cache"))
  assert choice.folder is not None
  from jax.experimental.compilation_cache import compilation_cache
  try:
    enabled = compile_cache.enable(str(blocker / "cache"))
    assert enabled.folder is None and enabled.source.startswith("off: cannot create")
    assert any("compilation cache off: cannot create" in r.getMessage() for r in caplog.records)
  finally:
    compile_cache.enable(os.environ[compile_cache.CACHE_VARIABLE])
    compilation_cache.reset_cache()
