"""The prepared device check: one command that measures this project on a borrowed accelerator.

A GPU machine (an NVIDIA H200 so far) is lent rarely and briefly: minutes, no network, a bare
image that has JAX, flax, optax and orbax but not ml_collections or tensorboardX, and a 64 MiB
limit on what travels to it. This module prepares everything here and runs everything there:

  python -m convnet_jax.tools.device_check prepare [--data_dir D] [--full]      # here, once
  python3 -m convnet_jax.tools.device_check run --out "$OUT"                     # there

`prepare` downloads the pure-Python wheels the image lacks (`CARRIED_WHEELS`, for python 3.12)
into `.device_check/wheels`, packs the real CIFAR data (`.device_check/cifar2`: the two classes
of the seed run, xz-compressed; with `--full` also the other eight classes, in chunks that each
fit in one call: `.device_check/rest1`, `rest2`, ...), checks what each call carries against the
64 MiB and prints the calls to make. `run` installs the wheels with pip `--no-index --no-deps`
into a folder of its own (the package itself runs from the source tree: no build step, so no
build requirements, no build isolation and no oneDNN extension, which a GPU never uses),
unpacks the data, checking every file's sha256, and runs the parts of `PARTS` in order, each in
a subprocess with its own time limit inside one budget, so that one slow or failing part leaves
the others' results. It writes three files into `--out`: `results.jsonl` (a line per part),
`summary.md` (the tables) and `log.txt` (every part's output). `run --dry_run` is the same
script at tiny sizes (narrow nets, one epoch, few examples): `tests/test_device_check.py` runs it
on the CPU from a virtual environment that holds only the image's packages and the carried
wheels, so that the script cannot rot between loans.

This module imports nothing outside the standard library at the top: on the device it starts
before the wheels are installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
FOLDER = ".device_check"  # ignored by git; named in the device call's `carry`
# What the image lacks and a run needs, as pure-Python wheels (the same files install on any
# python 3). ml_collections: every config; tensorboardX: a run's event files (on by default).
CARRIED_WHEELS = ("ml_collections", "tensorboardX")
# The image's own packages that this project uses (and what the carried wheels need): the dry
# run's virtual environment holds these and nothing else of the project's dependencies.
IMAGE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "absl-py",
                  "matplotlib", "tqdm", "filelock", "pillow", "pyyaml", "packaging", "protobuf")
WHEEL_PYTHON = "3.12"  # the image's python
# What travels in one call: the working tree (tracked and untracked-not-ignored files) and the
# carried paths together.
CALL_LIMIT_BYTES = 64 * 2**20
# Room kept free in a call beside the tree and the carried paths (files added before the call).
CALL_MARGIN_BYTES = 2 * 2**20
# input_pipeline's RECORD_BYTES, TRAIN_FILES + TEST_FILES and DATA_DIR_ENV, written again
# because the package imports JAX (tests/test_device_check.py holds them equal):
RECORD_BYTES = 3073  # CIFAR-10's binary records: one label byte, then 3 x 32 x 32 pixels
FILES = tuple(f"data_batch_{index}.bin" for index in range(1, 6)) + ("test_batch.bin",)
DATA_DIR_ENV = "CONVNET_JAX_DATA_DIR"
SEED_CLASSES = (0, 1)  # the seed run's CIFAR-2
XZ_PRESET = 6
# The budget of `run`: a device command may run 10 minutes; this leaves ~2 for the start-up,
# the wheels, the data and the transfers back.
DEFAULT_BUDGET_SECONDS = 480
# Captures the whole epoch's loop (a while loop whose trip count is only known at run time) as
# one CUDA graph: without it XLA copies the loop's predicate to the host after every step, a
# host sync per step (XLA's WhileThunk), and launches each step's kernels one by one.
COMMAND_BUFFER_FLAGS = "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"


# ----------------------------------------------------------------------------------------------
# Here: wheels, data packs, sizes.


def _folder_bytes(path: Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def download_wheels(wheels: Path, refresh: bool = False) -> list[Path]:
  """Downloads `CARRIED_WHEELS` for python `WHEEL_PYTHON` into `wheels` (one version of
  each; kept when already there, unless `refresh`) and checks that each is pure Python."""
  wheels.mkdir(parents=True, exist_ok=True)
  have = {_wheel_project(path): path for path in wheels.glob("*.whl")}
  missing = [name for name in CARRIED_WHEELS if _normalised(name) not in have or refresh]
  if missing:
    for path in wheels.glob("*.whl"):
      if _wheel_project(path) in {_normalised(name) for name in missing}:
        path.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", "--python-version", WHEEL_PYTHON, "--implementation", "cp",
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
         "-d", str(wheels), *missing], check=True)
  paths = sorted(wheels.glob("*.whl"))
  for path in paths:
    if not path.name.endswith("-none-any.whl"):
      raise SystemExit(f"error: {path.name} is not a pure-Python wheel; the dry run could not "
                       f"install the file the device gets")
  return paths


def _wheel_project(path: Path) -> str:
  """The normalised project name of a wheel file (PEP 503: runs of -_. as one -, lower case)."""
  return _normalised(path.name.split("-")[0])


def _normalised(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _read_records(path: Path) -> bytes:
  raw = path.read_bytes()
  if not raw or len(raw) % RECORD_BYTES:
    raise SystemExit(f"error: {path}: {len(raw)} bytes is not a whole number of "
                     f"{RECORD_BYTES}-byte CIFAR-10 records")
  return raw


def pack_data(data_dir: Path, folder: Path, full: bool, chunk_bytes: int) -> dict:
  """Packs the CIFAR-10 binary files of `data_dir`: the seed run's classes into
  `folder/cifar2` (with the manifest and every record's label) and, with `full`, the other
  classes' records into chunks of at most `chunk_bytes`, one folder each (`folder/rest1`, ...),
  so that each travels in a call of its own. Returns the manifest."""
  labels, seed_records, rest_records, files = bytearray(), [], [], []
  for name in FILES:
    raw = _read_records(data_dir / name)
    records = [raw[start:start + RECORD_BYTES] for start in range(0, len(raw), RECORD_BYTES)]
    seed = b"".join(record for record in records if record[0] in SEED_CLASSES)
    labels += bytes(record[0] for record in records)
    seed_records.append(seed)
    rest_records.append(b"".join(record for record in records if record[0] not in SEED_CLASSES))
    files.append({"name": name, "records": len(records),
                  "sha256": hashlib.sha256(raw).hexdigest(),
                  "seed_records": len(seed) // RECORD_BYTES,
                  "seed_sha256": hashlib.sha256(seed).hexdigest()})
  for old in folder.glob("rest*"):
    shutil.rmtree(old)
  cifar2 = folder / "cifar2"
  cifar2.mkdir(parents=True, exist_ok=True)
  (cifar2 / "seed_records.xz").write_bytes(lzma.compress(b"".join(seed_records),
                                                         preset=XZ_PRESET))
  (cifar2 / "labels.bin").write_bytes(bytes(labels))
  manifest = {"files": files, "seed_classes": list(SEED_CLASSES), "chunks": []}
  if full:
    rest = lzma.compress(b"".join(rest_records), preset=XZ_PRESET)
    # As few chunks as fit, of equal size: each call keeps the same room to spare.
    num_chunks = -(-len(rest) // chunk_bytes)
    chunk_bytes = -(-len(rest) // num_chunks)
    for index, start in enumerate(range(0, len(rest), chunk_bytes), 1):
      chunk = rest[start:start + chunk_bytes]
      path = folder / f"rest{index}" / f"rest_records.xz.{index}"
      path.parent.mkdir(parents=True)
      path.write_bytes(chunk)
      manifest["chunks"].append({"folder": path.parent.name, "name": path.name,
                                 "bytes": len(chunk),
                                 "sha256": hashlib.sha256(chunk).hexdigest()})
  (cifar2 / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
  return manifest


def tree_bytes(repo: Path = REPO) -> int:
  """What a device call sends of the checkout: tracked and untracked-not-ignored files."""
  try:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True).stdout.split(b"\0")
    paths = [repo / os.fsdecode(name) for name in listed if name]
  except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file not hidden
    paths = [path for path in repo.rglob("*")
             if not any(part.startswith(".") for part in path.relative_to(repo).parts)]
  return sum(path.stat().st_size for path in paths if path.is_file())


def plan_calls(folder: Path, manifest: dict, tree: int) -> list[dict]:
  """The device calls that carry the pack: one per data chunk, then the check's own call with
  the wheels and CIFAR-2. Each: {"carry", "bytes", "command"}; raises SystemExit when one would
  exceed `CALL_LIMIT_BYTES`."""
  relative = os.path.relpath(folder, REPO) if folder.is_relative_to(REPO) else str(folder)
  calls = [{"carry": [f"{relative}/{chunk['folder']}"],
            "bytes": tree + chunk["bytes"],
            "command": f"ls -l {relative}/*"} for chunk in manifest["chunks"]]
  check = [f"{relative}/wheels", f"{relative}/cifar2"]
  calls.append({"carry": check,
                "bytes": tree + sum(_folder_bytes(folder / Path(path).name) for path in check),
                "command": "python3 -m convnet_jax.tools.device_check run --out \"$OUT\""})
  for call in calls:
    if call["bytes"] > CALL_LIMIT_BYTES:
      raise SystemExit(f"error: a device call carrying {call['carry']} would send "
                       f"{call['bytes'] / 2**20:.1f} MiB, over the {CALL_LIMIT_BYTES // 2**20} "
                       f"MiB a call may carry; make the chunks smaller (--chunk_mib)")
  return calls


def prepare(args) -> None:
  """`prepare`: the wheels, the data pack and the plan of calls (see the module)."""
  folder = Path(args.folder).resolve()
  data_dir = Path(args.data_dir or os.environ.get(DATA_DIR_ENV)
                  or REPO.parent / "shared" / "data" / "cifar10")
  for name in FILES:  # before any download or packing
    if not (data_dir / name).is_file():
      raise SystemExit(f"error: {data_dir / name}: no such file; --data_dir must be a folder "
                       f"of the CIFAR-10 binary files ({', '.join(FILES)})")
  wheels = download_wheels(folder / "wheels", args.refresh_wheels)
  tree = tree_bytes()
  chunk_bytes = (int(args.chunk_mib * 2**20) if args.chunk_mib
                 else CALL_LIMIT_BYTES - CALL_MARGIN_BYTES - tree)
  manifest = pack_data(data_dir, folder, args.full, chunk_bytes)
  calls = plan_calls(folder, manifest, tree)
  print(json.dumps({"wheels": [path.name for path in wheels],
                    "wheels_bytes": sum(path.stat().st_size for path in wheels),
                    "cifar2_bytes": _folder_bytes(folder / "cifar2"),
                    "chunks": [{key: chunk[key] for key in ("folder", "bytes")}
                               for chunk in manifest["chunks"]],
                    "tree_bytes": tree, "calls": calls}, indent=1))


# ----------------------------------------------------------------------------------------------
# There: install, unpack, run the parts.


def install_wheels(wheels: Path, site: Path) -> list[str]:
  """pip-installs the carried wheels into `site` without an index or their dependencies."""
  paths = sorted(wheels.glob("*.whl"))
  if paths:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--no-compile", "--disable-pip-version-check", "--upgrade", "--target",
                    str(site), *map(str, paths)], check=True)
  return [path.name for path in paths]


def _write_files(folder: Path, records_by_file: dict[str, bytes], manifest: dict,
                 hash_key: str) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  for entry in manifest["files"]:
    data = records_by_file[entry["name"]]
    if hashlib.sha256(data).hexdigest() != entry[hash_key]:
      raise RuntimeError(f"{folder / entry['name']}: unpacked bytes differ from the packed ones")
    (folder / entry["name"]).write_bytes(data)


def unpack_data(folder: Path, target: Path) -> dict:
  """Unpacks the carried data into `target/cifar2` and, where every chunk of the other classes
  is present (carried in earlier calls), `target/cifar10`; every file checked against the
  manifest's sha256. Returns {"cifar2": path or None, "cifar10": path or None, "note"}."""
  found = {"cifar2": None, "cifar10": None, "note": ""}
  manifest_path = folder / "cifar2" / "manifest.json"
  if not manifest_path.is_file():
    found["note"] = f"no {manifest_path}: no data carried (run prepare, carry {FOLDER}/cifar2)"
    return found
  manifest = json.loads(manifest_path.read_text())
  seed = lzma.decompress((folder / "cifar2" / "seed_records.xz").read_bytes())
  seed_by_file, start = {}, 0
  for entry in manifest["files"]:
    end = start + entry["seed_records"] * RECORD_BYTES
    seed_by_file[entry["name"]], start = seed[start:end], end
  _write_files(target / "cifar2", seed_by_file, manifest, "seed_sha256")
  found["cifar2"] = str(target / "cifar2")
  chunks = manifest["chunks"]
  missing = [chunk["folder"] for chunk in chunks
             if not (folder / chunk["folder"] / chunk["name"]).is_file()]
  if not chunks or missing:
    found["note"] = ("CIFAR-10's other classes were not packed (prepare --full)" if not chunks
                     else f"CIFAR-10's other classes incomplete: {', '.join(missing)} not here")
    return found
  parts = []
  for chunk in chunks:
    data = (folder / chunk["folder"] / chunk["name"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != chunk["sha256"]:
      found["note"] = f"{chunk['folder']}/{chunk['name']} is damaged (sha256 differs)"
      return found
    parts.append(data)
  rest = lzma.decompress(b"".join(parts))
  labels = (folder / "cifar2" / "labels.bin").read_bytes()
  seed_at = rest_at = label_at = 0
  whole = {}
  for entry in manifest["files"]:
    records = []
    for label in labels[label_at:label_at + entry["records"]]:
      if label in manifest["seed_classes"]:
        records.append(seed[seed_at:seed_at + RECORD_BYTES])
        seed_at += RECORD_BYTES
      else:
        records.append(rest[rest_at:rest_at + RECORD_BYTES])
        rest_at += RECORD_BYTES
    label_at += entry["records"]
    whole[entry["name"]] = b"".join(records)
  _write_files(target / "cifar10", whole, manifest, "sha256")
  found["cifar10"] = str(target / "cifar10")
  return found


@dataclasses.dataclass(frozen=True)
class Context:
  """What the parts share: where things are, the children's environment, the budget."""
  out: Path
  scratch: Path
  data: dict
  env: dict
  dry_run: bool
  deadline: float
  log: Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Part:
  """One measurement: `run(context, seconds)` -> its result (a dict); `needs` names the data
  it reads ("cifar2", "cifar10" or None)."""
  name: str
  seconds: int
  needs: str | None
  run: Callable[[Context, float], dict]


def _child(context: Context, argv: list[str], seconds: float, extra_env: dict | None = None
           ) -> tuple[int | None, float]:
  """Runs `argv` with the package's environment for at most `seconds`, its output appended to
  the log: (exit status or None after the time limit, seconds taken)."""
  env = dict(context.env, **(extra_env or {}))
  start = time.perf_counter()
  context.log(f"$ {' '.join(argv)}" + (f"   ({extra_env})" if extra_env else ""))
  with open(context.out / "log.txt", "a") as log:
    # A session of its own, so that a part over its limit is stopped with everything it
    # started, and leaves the device free for the next.
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
      status = child.wait(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
      os.killpg(child.pid, signal.SIGKILL)
      child.wait()
      status = None
  return status, round(time.perf_counter() - start, 2)


def _status(status: int | None) -> str:
  return "ok" if status == 0 else ("timeout" if status is None else f"failed (exit {status})")


def _python_module(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", module, *args]


def _run_flags(config: str, data_dir: str | None, workdir: Path, dry_run: bool,
               seed: int | None = None) -> list[str]:
  flags = [f"--config={config}", f"--workdir={workdir}",
           "--config.operations.progress_bar=False"]
  if data_dir:
    flags.append(f"--config.data.dir={data_dir}")
  if seed is not None:
    flags.append(f"--config.seed={seed}")
  if dry_run:
    flags += ["--config.num_epochs=1", "--config.batch_size=64", "--config.eval.batch_size=32"]
    flags += _narrow(config)
  return flags


def _narrow(config: str) -> list[str]:
  """The dry run's narrower nets (airbench's groups of 8 and 16 channels); the seed net is
  small already and has no width key."""
  return [] if config.endswith("default.py") else ["--config.model.airbench.widths=(8,16,16)"]


def _metrics(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def environment(context: Context, seconds: float) -> dict:
  """The machine: nvidia-smi's view, and JAX's devices and versions as the runs see them."""
  result = {}
  if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                          "clocks.max.sm,power.limit", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    result["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
  probe = ("import json, platform, jax, jaxlib, flax, optax, ml_collections, orbax.checkpoint;"
           "d = jax.devices();"
           "print(json.dumps({'python': platform.python_version(), 'jax': jax.__version__,"
           " 'jaxlib': jaxlib.__version__, 'flax': flax.__version__, 'optax': optax.__version__,"
           " 'backend': jax.default_backend(), 'device_kind': d[0].device_kind,"
           " 'device_count': len(d)}))")
  output = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=context.env,
                          capture_output=True, text=True, timeout=seconds)
  if output.returncode:
    context.log(output.stderr)
    return dict(result, status=_status(output.returncode))
  result.update(json.loads(output.stdout.strip().splitlines()[-1]))
  result["xla_flags"] = context.env.get("XLA_FLAGS", "")
  return dict(result, status="ok")


def seed_run(context: Context, seconds: float) -> dict:
  """The seed network's run (`configs/default.py`, CIFAR-2): its JSON lines."""
  workdir = context.scratch / "seed_run"
  status, taken = _child(context, _python_module("convnet_jax.main", *_run_flags(
      "configs/default.py", context.data["cifar2"], workdir, context.dry_run)), seconds)
  return {"status": _status(status), "wall_seconds": taken, "epochs": _metrics(workdir)}


def benchmark(config: str, dtypes: tuple[str, ...], xla_flags: str = "") -> Callable:
  """A part that runs `python -m convnet_jax.benchmark` on `config` for `dtypes` (with
  `xla_flags` added to XLA_FLAGS) and keeps its report."""

  def run(context: Context, seconds: float) -> dict:
    workdir = context.scratch / ("benchmark_" + Path(config).stem + ("_flags" if xla_flags
                                                                       else ""))
    # The dry run times float32 alone: on a CPU the ceiling is measured, seconds a dtype.
    timed = ("float32",) if context.dry_run else dtypes
    flags = [f"--config={config}", f"--workdir={workdir}",
             "--config.benchmark.dtypes=(" + "".join(f"'{d}'," for d in timed) + ")"]
    if context.dry_run:
      flags += ["--config.batch_size=32", "--config.benchmark.num_examples=64",
                "--config.benchmark.warmup_steps=1", "--config.benchmark.num_steps=2",
                "--config.benchmark.num_epochs=1"] + _narrow(config)
    extra = ({"XLA_FLAGS": (context.env.get("XLA_FLAGS", "") + " " + xla_flags).strip()}
             if xla_flags else None)
    status, taken = _child(context, _python_module("convnet_jax.benchmark", *flags), seconds,
                           extra)
    report_path = workdir / "benchmark.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    keys = ("dtype", "batch_size", "compile_seconds", "step_ms", "epoch_step_ms",
            "images_per_second", "step_gflop", "achieved_gflop_per_second", "ceiling",
            "utilisation")
    return {"status": _status(status), "wall_seconds": taken, "config": config,
            "xla_flags": xla_flags, "device_kind": report.get("device_kind"),
            "results": [{key: result.get(key) for key in keys}
                        for result in report.get("results", [])]}

  return run


def seeds(config: str, max_seeds: int) -> Callable:
  """A part that trains `config` on CIFAR-10 for seeds 0, 1, ... while the next one fits (the
  compilation cache makes every run after the first start warm): each seed's last line and the
  means."""

  def run(context: Context, seconds: float) -> dict:
    end = time.perf_counter() + seconds
    runs, longest = [], 0.0
    for seed in range(min(max_seeds, 2) if context.dry_run else max_seeds):
      left = end - time.perf_counter()
      if runs and left < 1.2 * longest:
        break
      workdir = context.scratch / f"{Path(config).stem}_seed{seed}"
      # Evaluated and saved at the end only, as airbench's records are timed.
      flags = _run_flags(config, context.data["cifar10"], workdir, context.dry_run, seed) + [
          "--config.operations.eval_every_epochs=0",
          "--config.operations.checkpoint_every_epochs=1000"]
      status, taken = _child(context, _python_module("convnet_jax.main", *flags), left)
      longest = max(longest, taken)
      lines = _metrics(workdir)
      runs.append({"seed": seed, "status": _status(status), "wall_seconds": taken,
                   "last": lines[-1] if lines else None,
                   "per_epoch": [line.get("test_acc") for line in lines]})
      if status != 0:
        break
    done = [entry["last"] for entry in runs if entry["status"] == "ok" and entry["last"]]
    means = {}
    for key in ("test_acc", "tta_test_acc", "time"):
      values = [line[key] for line in done if key in line]
      if values:
        means[key] = round(statistics.fmean(values), 5)
    return {"status": "ok" if done and len(done) == len(runs) else
            (runs[-1]["status"] if runs else "skipped: no time"),
            "config": config, "runs": runs, "mean": means}

  return run


# In order of what a loan should show first; each with its own limit (seconds, within the
# budget) and the data it needs. With CIFAR-2 alone (one call): the seed run and every
# benchmark; with the whole CIFAR-10 carried too: the recipes' accuracy.
PARTS = (
    Part("environment", 60, None, environment),
    Part("seed_run", 120, "cifar2", seed_run),
    Part("speedrun_seeds", 150, "cifar10", seeds("configs/cifar10_speedrun.py", 20)),
    Part("benchmark_speedrun", 120, None,
         benchmark("configs/cifar10_speedrun.py", ("bfloat16", "float32"))),
    Part("benchmark_speedrun_command_buffers", 75, None,
         benchmark("configs/cifar10_speedrun.py", ("bfloat16",), COMMAND_BUFFER_FLAGS)),
    Part("airbench95", 120, "cifar10", seeds("configs/cifar10_airbench95.py", 1)),
    Part("benchmark_airbench94", 90, None,
         benchmark("configs/cifar10_airbench94.py", ("bfloat16", "float32"))),
    Part("benchmark_airbench94_muon", 90, None,
         benchmark("configs/cifar10_airbench94_muon.py", ("bfloat16", "float32"))),
    Part("benchmark_seed_net", 60, None,
         benchmark("configs/default.py", ("bfloat16", "float32"))),
)
PART_NAMES = tuple(part.name for part in PARTS)


def summary(results: list[dict], data_note: str) -> str:
  """The run's results as Markdown tables."""
  lines = ["# Device check", ""]
  environment_result = next((r for r in results if r["part"] == "environment"), {})
  if environment_result:
    lines += [f"- {key}: {environment_result[key]}" for key in
              ("nvidia_smi", "device_kind", "device_count", "backend", "python", "jax", "jaxlib",
               "flax", "optax", "xla_flags") if key in environment_result]
  if data_note:
    lines.append(f"- data: {data_note}")
  lines += ["", "| part | status | seconds |", "|---|---|---|"]
  lines += [f"| {r['part']} | {r['status']} | {r.get('part_seconds', '')} |" for r in results]
  lines += ["", "| config | XLA flags | dtype | compile s | step ms (in an epoch's call) | "
            "images/s | GFLOP/s | utilisation | ceiling |", "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    for row in r.get("results", []) if r["part"].startswith("benchmark") else []:
      lines.append(f"| {Path(r['config']).stem} | {r['xla_flags'] or 'default'} | {row['dtype']} "
                   f"| {row['compile_seconds']} | {row['epoch_step_ms']} | "
                   f"{row['images_per_second']} | {row['achieved_gflop_per_second']} | "
                   f"{row['utilisation']} | {(row['ceiling'] or {}).get('source', '').split(',')[0]} |")
  for r in results:
    if r["part"] == "seed_run" and r.get("epochs"):
      lines += ["", "Seed run (configs/default.py, CIFAR-2):", "```"]
      lines += [json.dumps(epoch) for epoch in r["epochs"]] + ["```"]
    if r.get("runs"):
      lines += ["", f"{Path(r['config']).stem}: " + ", ".join(
          f"seed {run['seed']} {(run['last'] or {}).get('tta_test_acc', '')}"
          f" ({run['wall_seconds']} s)" for run in r["runs"]) + f"; mean {r['mean']}"]
  return "\n".join(lines) + "\n"


def run(args) -> int:
  """`run`: install, unpack, then the parts in order within the budget (see the module)."""
  start = time.perf_counter()
  selected = args.parts.split(",") if args.parts else list(PART_NAMES)
  unknown = sorted(set(selected) - set(PART_NAMES))
  if unknown:
    raise SystemExit(f"error: --parts: unknown {', '.join(unknown)}; the parts are "
                     f"{', '.join(PART_NAMES)}")
  out = Path(args.out or os.environ.get("OUT") or "device_check_out").resolve()
  out.mkdir(parents=True, exist_ok=True)
  for name in ("results.jsonl", "summary.md", "log.txt"):
    (out / name).unlink(missing_ok=True)
  scratch = Path(args.scratch).resolve()
  # A check run again on a warm machine starts its runs afresh (the compilation cache stays).
  shutil.rmtree(scratch / "runs", ignore_errors=True)
  scratch.mkdir(parents=True, exist_ok=True)
  folder = Path(args.folder).resolve()

  def log(text: str) -> None:
    with open(out / "log.txt", "a") as file:
      file.write(text.rstrip("\n") + "\n")
    print(text, file=sys.stderr, flush=True)

  results_path = out / "results.jsonl"

  def record(result: dict) -> None:
    results.append(result)
    with open(results_path, "a") as file:
      file.write(json.dumps(result) + "\n")
    log(f"[{time.perf_counter() - start:6.1f} s] {result['part']}: {result['status']}")

  results: list[dict] = []
  site = scratch / "site"
  try:
    record({"part": "install", "status": "ok",
            "wheels": install_wheels(folder / "wheels", site),
            "part_seconds": round(time.perf_counter() - start, 2)})
  except subprocess.CalledProcessError as error:  # the parts then say what is missing
    record({"part": "install", "status": f"failed ({error})"})
  data_start = time.perf_counter()
  try:
    data = unpack_data(folder, scratch / "data")
    status = "ok"
  except (OSError, ValueError, RuntimeError, lzma.LZMAError) as error:
    data = {"cifar2": None, "cifar10": None, "note": f"{type(error).__name__}: {error}"}
    status = f"failed ({data['note']})"
  record({"part": "data", "status": status, "cifar2": bool(data["cifar2"]),
          "cifar10": bool(data["cifar10"]), "note": data["note"],
          "part_seconds": round(time.perf_counter() - data_start, 2)})
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
      [str(site), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  # Every run after the first of a program starts warm (XLA's autotuning results included).
  env["CONVNET_JAX_COMPILATION_CACHE"] = str(scratch / "compilation_cache")
  context = Context(out, scratch / "runs", data, env, args.dry_run,
                    start + args.budget_seconds, log)
  for part in PARTS:
    if part.name not in selected:
      continue
    left = context.deadline - time.perf_counter()
    if part.needs and not data[part.needs]:
      record({"part": part.name, "status": f"skipped: needs {part.needs} ({data['note']})"})
      continue
    if left < 10:
      record({"part": part.name, "status": f"skipped: {left:.0f} s of the budget left"})
      continue
    part_start = time.perf_counter()
    try:
      result = part.run(context, min(part.seconds, left))
    except Exception as error:  # one part's failure must not lose the others' results
      result = {"status": f"failed ({type(error).__name__}: {error})"}
    record(dict({"part": part.name}, **result,
                part_seconds=round(time.perf_counter() - part_start, 2)))
  (out / "summary.md").write_text(summary(results, data["note"]))
  log(f"device check: {time.perf_counter() - start:.1f} s; {out / 'summary.md'}")
  return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped")
                  for r in results) else 1


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m convnet_jax.tools.device_check",
                                   description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  prep = commands.add_parser("prepare", help="here: wheels, data pack, the calls to make")
  prep.add_argument("--data_dir", help="the CIFAR-10 binary files (default: $CONVNET_JAX_DATA_DIR "
                    "or ../shared/data/cifar10)")
  prep.add_argument("--folder", default=str(REPO / FOLDER))
  prep.add_argument("--full", action="store_true",
                    help="also pack CIFAR-10's other classes, in chunks of a call each")
  prep.add_argument("--chunk_mib", type=float, default=0.0,
                    help="chunk size (default: what a call leaves beside the tree)")
  prep.add_argument("--refresh_wheels", action="store_true")
  check = commands.add_parser("run", help="there: install, unpack, measure")
  check.add_argument("--out", help="the folder for results.jsonl, summary.md, log.txt "
                     "(default: $OUT)")
  check.add_argument("--folder", default=str(REPO / FOLDER))
  check.add_argument("--scratch", default=os.path.join(
      os.environ.get("TMPDIR", "/tmp"), "convnet_jax_device_check"))
  check.add_argument("--budget_seconds", type=float, default=DEFAULT_BUDGET_SECONDS)
  check.add_argument("--parts", help="comma-separated, of: " + ", ".join(PART_NAMES))
  check.add_argument("--dry_run", action="store_true",
                     help="tiny sizes, to check the script on a CPU")
  args = parser.parse_args(argv)
  if args.command == "prepare":
    prepare(args)
    return 0
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
