"""The notebooks run top to bottom on the real CIFAR-10 (small settings), and are committed
without outputs."""

import nbclient
import nbformat
import pytest

from conftest import REPO_ROOT
from convnet_jax.data import input_pipeline

NOTEBOOKS = REPO_ROOT / "notebooks"
NAMES = ["seed_cifar2.ipynb", "resnet_cifar10.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_without_errors(name, cifar10_dir, monkeypatch):
  # The kernel inherits this environment; the notebook's cwd is notebooks/, as when opened there.
  monkeypatch.setenv(input_pipeline.DATA_DIR_ENV, str(cifar10_dir))
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  outputs = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.outputs]
  assert not [output for output in outputs if output.output_type == "error"]
  images = [output for output in outputs if "image/png" in output.get("data", {})]
  assert len(images) >= 2, "the figures were not displayed"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None
