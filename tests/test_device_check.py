"""The prepared device check (`convnet_jax.tools.device_check`): the data pack that travels in
pieces and comes back byte for byte, the size limit of a call, and the whole script's dry run on
the CPU from a virtual environment that holds only what the GPU machine's image has."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convnet_jax.data import input_pipeline
from convnet_jax.tools import device_check
from tests.conftest import REPO_ROOT

SEED_CLASSES = (0, 1)  # the spec's CIFAR-2


def _records(path: Path) -> np.ndarray:
  return np.fromfile(path, np.uint8).reshape(-1, 3073)


def test_the_stdlib_only_constants_are_the_readers_own():
  assert device_check.RECORD_BYTES == input_pipeline.RECORD_BYTES
  assert device_check.FILES == input_pipeline.TRAIN_FILES + input_pipeline.TEST_FILES
  assert device_check.DATA_DIR_ENV == input_pipeline.DATA_DIR_ENV


def test_the_pack_unpacks_to_the_seed_classes_and_to_the_original_files(tiny_cifar_dir,
                                                                         tmp_path):
  folder = tmp_path / "pack"
  manifest = device_check.pack_data(tiny_cifar_dir, folder, full=True, chunk_bytes=1000)
  assert len(manifest["chunks"]) > 1  # the other classes really travel in pieces
  found = device_check.unpack_data(folder, tmp_path / "unpacked")
  assert found["note"] == ""
  for name in device_check.FILES:
    original = _records(tiny_cifar_dir / name)
    # CIFAR-2: the records of classes 0 and 1, in their order, selected here by hand.
    expected = original[np.isin(original[:, 0], SEED_CLASSES)]
    np.testing.assert_array_equal(_records(Path(found["cifar2"]) / name), expected)
    assert (Path(found["cifar10"]) / name).read_bytes() == (tiny_cifar_dir / name).read_bytes()


def test_a_missing_or_damaged_chunk_leaves_cifar2_and_says_which(tiny_cifar_dir, tmp_path):
  folder = tmp_path / "pack"
  manifest = device_check.pack_data(tiny_cifar_dir, folder, full=True, chunk_bytes=1000)
  last = manifest["chunks"][-1]
  (folder / last["folder"] / last["name"]).unlink()
  found = device_check.unpack_data(folder, tmp_path / "a")
  assert found["cifar2"] and found["cifar10"] is None
  assert found["note"] == f"CIFAR-10's other classes incomplete: {last['folder']} not here"
  first = manifest["chunks"][0]
  path = folder / first["folder"] / first["name"]
  path.write_bytes(b"x" + path.read_bytes()[1:])
  (folder / last["folder"]).mkdir(exist_ok=True)
  (folder / last["folder"] / last["name"]).write_bytes(b"")
  found = device_check.unpack_data(folder, tmp_path / "b")
  assert found["cifar10"] is None and "is damaged" in found["note"]


def test_without_a_pack_the_check_says_so(tmp_path):
  found = device_check.unpack_data(tmp_path / "nothing", tmp_path / "out")
  assert found["cifar2"] is None and "no data carried" in found["note"]


def test_a_call_over_64_mib_is_refused_before_the_loan(tiny_cifar_dir, tmp_path):
  folder = tmp_path / "pack"
  manifest = device_check.pack_data(tiny_cifar_dir, folder, full=True, chunk_bytes=1000)
  (folder / "wheels").mkdir()
  calls = device_check.plan_calls(folder, manifest, tree=1000)
  assert [call["carry"][-1].rsplit("/", 1)[-1] for call in calls] == (
      [chunk["folder"] for chunk in manifest["chunks"]] + ["cifar2"])
  assert calls[0]["bytes"] == 1000 + manifest["chunks"][0]["bytes"]
  with pytest.raises(SystemExit, match="over the 64 MiB a call may carry"):
    device_check.plan_calls(folder, manifest, tree=64 * 2**20 - 500)


def test_unknown_parts_are_one_line_before_anything_runs(tmp_path):
  with pytest.raises(SystemExit, match="--parts: unknown benchmark_everything; the parts are "
                     "environment, seed_run"):
    device_check.main(["run", "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "s"),
                       "--parts", "seed_run,benchmark_everything"])
  assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_the_dry_run_passes_from_the_gpu_images_packages_alone(cifar10_dir, tmp_path):
  """What a loan runs, at tiny sizes on the CPU: a fresh virtual environment with the image's
  packages (`IMAGE_PACKAGES`) and nothing else of the project's dependencies, the wheels that
  `prepare` downloads, real CIFAR-10 records packed, carried in chunks and unpacked."""
  venv = tmp_path / "image"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  *device_check.IMAGE_PACKAGES], check=True)
  missing = subprocess.run([python, "-c", "import ml_collections"], capture_output=True)
  assert missing.returncode == 1  # the carried wheel is what provides it
  data = tmp_path / "cifar10"  # 300 real records a file, so the runs take seconds
  data.mkdir()
  for name in device_check.FILES:
    (data / name).write_bytes((cifar10_dir / name).read_bytes()[:3073 * 300])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
  folder, out = tmp_path / "carried", tmp_path / "out"
  prepared = subprocess.run(
      [python, "-m", "convnet_jax.tools.device_check", "prepare", f"--data_dir={data}", "--full",
       "--chunk_mib=0.5", f"--folder={folder}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True)
  assert prepared.returncode == 0, prepared.stderr
  plan = json.loads(prepared.stdout)
  assert sorted(plan["wheels"])[0].startswith("ml_collections-")
  assert len(plan["calls"]) == len(plan["chunks"]) + 1 >= 3
  result = subprocess.run(
      [python, "-m", "convnet_jax.tools.device_check", "run", "--dry_run", f"--out={out}",
       f"--folder={folder}", f"--scratch={tmp_path / 'scratch'}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True)
  results = {line["part"]: line for line in map(json.loads, (out / "results.jsonl").open())}
  assert result.returncode == 0, ({name: line["status"] for name, line in results.items()},
                                  (out / "log.txt").read_text()[-3000:])
  assert {name: results[name]["status"] for name in device_check.PART_NAMES} == {
      name: "ok" for name in device_check.PART_NAMES}
  assert results["data"]["cifar2"] and results["data"]["cifar10"]
  assert results["environment"]["backend"] == "cpu"
  assert len(results["seed_run"]["epochs"]) == 1  # the dry run's one epoch
  assert [run["seed"] for run in results["speedrun_seeds"]["runs"]] == [0, 1]
  assert "tta_test_acc" in results["speedrun_seeds"]["mean"]
  bench = results["benchmark_speedrun_command_buffers"]
  assert bench["results"][0]["dtype"] == "float32" and bench["results"][0]["utilisation"] > 0
  # What comes back from a device call: at most 8 files, plain names.
  assert sorted(path.name for path in out.iterdir()) == ["log.txt", "results.jsonl",
                                                         "summary.md"]
  assert "| benchmark_seed_net | ok |" in (out / "summary.md").read_text()


def _context(tmp_path, seconds_left=60.0):
  out = tmp_path / "out"
  out.mkdir()
  return device_check.Context(out, tmp_path / "runs", {}, dict(os.environ), True,
                              time.perf_counter() + seconds_left, lambda text: None)


def test_a_part_over_its_limit_is_stopped_with_what_it_started(tmp_path):
  pid_file = tmp_path / "grandchild.pid"
  script = f"sleep 60 & echo $! > {pid_file}; wait"
  status, taken = device_check._child(_context(tmp_path), ["sh", "-c", script], seconds=1.0)
  assert status is None and 1.0 <= taken < 20
  stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
  time.sleep(0.2)
  # The background sleep went with its parent: gone, or dead and not yet reaped by whoever
  # inherited it.
  assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_damaged_data_fails_its_part_and_the_check_goes_on(tiny_cifar_dir, tmp_path):
  folder = tmp_path / "pack"
  device_check.pack_data(tiny_cifar_dir, folder, full=False, chunk_bytes=1000)
  path = folder / "cifar2" / "seed_records.xz"
  path.write_bytes(path.read_bytes()[:-20])  # a truncated transfer
  out = tmp_path / "out"
  status = device_check.main(["run", f"--out={out}", f"--folder={folder}",
                              f"--scratch={tmp_path / 'scratch'}", "--parts=seed_run"])
  results = [json.loads(line) for line in (out / "results.jsonl").open()]
  assert status == 1
  assert [(r["part"], r["status"].split(" ")[0]) for r in results] == [
      ("install", "ok"), ("data", "failed"), ("seed_run", "skipped:")]
  assert "LZMAError" in results[1]["note"]
  assert "| seed_run | skipped: needs cifar2" in (out / "summary.md").read_text()
