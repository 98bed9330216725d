"""The run's programs compiled for a TPU topology (libtpu's compile-only devices) and lowered for
GPU, on a machine with neither: every registered model, float32 and bfloat16."""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import Mesh

from configs import default as default_config
from configs import smoke
from conftest import REPO_ROOT
from convnet_jax import models
from convnet_jax.errors import UserError
from convnet_jax.tools import aot

TOPOLOGY = "v5e:2x2"  # four chips


def _tiny_config(model: str, dtype: str = "float32"):
  config = default_config.get_config()
  config.model.name, config.model.dtype = model, dtype
  config.data.classes = tuple(range(10))
  # Tiny shapes and narrow ResNets (the same layers, 8 channels wide at the start): what is
  # checked is that the programs compile, and libtpu takes minutes on 2 cores for a full-width
  # ResNet-50.
  config.batch_size = config.eval.batch_size = 16
  config.data.max_train_examples, config.data.max_test_examples = 64, 40
  config.model.resnet.width = 8
  return config


# The seed net in float32 is the benchmark mode's test, below, which compiles all three programs.
EVERY_MODEL_AND_DTYPE = [(model, dtype) for model in sorted(models.MODELS)
                         for dtype in ("float32", "bfloat16")
                         if (model, dtype) != ("seed_convnet", "float32")]


@pytest.mark.slow
@pytest.mark.parametrize("model, dtype", EVERY_MODEL_AND_DTYPE)
def test_every_model_compiles_for_a_tpu_topology_with_the_batch_split_over_its_chips(model,
                                                                                   dtype):
  # The training program; the evaluation is the same forward pass in a plainer loop, compiled
  # in the benchmark mode's test.
  report = aot.compile_for_tpu(_tiny_config(model, dtype), TOPOLOGY, ("train_steps",))
  assert report["target"]["chips"] == 4 and "TPU" in report["target"]["device_kind"]
  assert report["conv_implementation"] == "xla"  # what `auto` resolves to on a TPU
  program = report["programs"]["train_steps"]
  assert program["compiled"], program.get("error")
  memory = program["memory_per_chip_bytes"]
  assert memory["argument"] > 0 and memory["output"] > 0
  # Split over the chips: each holds a quarter of each batch, and the gradients and the
  # metrics are summed across them.
  assert program["all_reduce"]


@pytest.mark.parametrize("platform", ["cuda", pytest.param("rocm", marks=pytest.mark.slow)])
@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_every_model_lowers_for_gpu_without_cpu_only_calls(model, platform):
  report = aot.lower_for_gpu(_tiny_config(model), platform)
  assert report["conv_implementation"] == "xla"
  for name, program in report["programs"].items():
    assert program["lowered"], f"{name}: {program.get('error')}"
    assert program["cpu_only_custom_calls"] == []


def test_the_cpu_lowering_does_hold_the_onednn_calls():
  """The check above would notice them: the same search finds the oneDNN targets in a CPU
  module."""
  config = _tiny_config("seed_convnet")
  traced = aot.traced_programs(config, None, backend="cpu")
  if traced["conv_implementation"] != "onednn":
    pytest.fail(f"the oneDNN path should run here, not {traced['conv_implementation']}")
  targets = aot.custom_call_targets(traced["train_steps"].lower().as_text())
  assert any(aot.CPU_ONLY_TARGET.search(target) for target in targets), targets


def test_onednn_asked_for_on_a_tpu_is_refused_naming_the_key():
  config = _tiny_config("seed_convnet")
  config.model.conv_implementation = "onednn"
  with pytest.raises(UserError, match=r"config.model.conv_implementation='onednn': oneDNN runs on "
                                      r"the CPU backend only"):
    aot.traced_programs(config, None, backend="tpu")


def test_an_unknown_topology_is_one_line():
  with pytest.raises(UserError, match=r"benchmark.aot_topology='v5e:9x9x9'"):
    aot.tpu_mesh("v5e:9x9x9")


def _benchmark(*args, block_libtpu=False):
  """The benchmark command; `block_libtpu`: as if libtpu were not installed (its module cannot
  be imported and TPU_LIBRARY_PATH, which importing libtpu sets in this process, is unset)."""
  prelude = "import sys; sys.modules['libtpu'] = None; " if block_libtpu else "import sys; "
  code = (prelude + "import runpy; sys.argv = ['benchmark'] + sys.argv[1:]; "
          "runpy.run_module('convnet_jax.benchmark', run_name='__main__')")
  environment = dict(os.environ)
  if block_libtpu:
    environment.pop("TPU_LIBRARY_PATH", None)
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=environment,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_benchmark_mode_prints_and_saves_its_report_and_a_chip_does_its_quarter(tmp_path):
  result = _benchmark("--config", "configs/smoke.py",
                      f"--config.benchmark.aot_topology={TOPOLOGY}", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert json.loads((tmp_path / "benchmark.json").read_text()) == report
  [entry] = report["tpu"]
  assert entry["dtype"] == "float32" and entry["target"]["chips"] == 4
  for name, program in entry["programs"].items():
    assert program["compiled"], f"{name}: {program.get('error')}"
    assert program["all_reduce"]
  assert "not measurements" in entry["estimates"]["note"]
  assert [lowered["target"]["platform"] for lowered in report["gpu_lowering"]] == ["cuda", "rocm"]
  # The same step on one chip of the topology: the four chips each did a quarter of it. The
  # seed net's step is convolutions on the batch of 64; the optimiser's update of its 108,208
  # parameters, done on every chip, is under 1% of it.
  four_chips = aot.tpu_mesh(TOPOLOGY)
  one_chip = Mesh(four_chips.devices.ravel()[:1], four_chips.axis_names)
  compiled = aot.traced_programs(smoke.get_config(), one_chip,
                                 backend="tpu")["train_step"].lower().compile()
  assert entry["estimates"]["flops_per_chip_per_step"] == pytest.approx(
      compiled.cost_analysis()["flops"] / 4, rel=0.02)


@pytest.mark.slow
def test_without_libtpu_the_mode_says_how_to_install_it(tmp_path):
  result = _benchmark("--config", "configs/smoke.py",
                      f"--config.benchmark.aot_topology={TOPOLOGY}", block_libtpu=True)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f"error: benchmark.aot_topology='{TOPOLOGY}': compiling for a TPU needs libtpu, which is "
      f"not installed; {aot.INSTALL_TPU}"]
