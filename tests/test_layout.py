"""The package's layout, held against its code: which modules read the whole config, who
imports whom, how long the public signatures are and how many keys the config has at its top.
Read from the source with `ast`, nothing imported."""

import ast

from configs import default as default_config
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "convnet_jax"
# Where the whole config may be read: the entry points, the loop and its preparation,
# validation, the sweep and the tools. Every other module gets its group or an options object.
WHOLE_CONFIG_READERS = ("main.py", "train.py", "runs/prepare.py", "runs/validation.py",
                        "sweep/", "tools/")
# The layers below `runs`: none of them may import it.
LOWER_LAYERS = ("data/", "ops/", "models/", "parallel/", "budget.py", "errors.py", "optim.py",
                "steps.py", "programs.py")
MAX_PARAMETERS = 7
MAX_TOP_LEVEL_KEYS = 16  # 3 keys and 13 groups (the 13th: `select`, data selection)


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path))


def _parameters(function) -> list[str]:
  arguments = function.args
  names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
  return [name for name in names if name not in ("self", "cls")]


def _functions(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def test_only_the_entry_points_the_loop_and_validation_take_the_whole_config():
  takers = [f"{name}:{function.name}" for name, tree in _modules()
            if not name.startswith(WHOLE_CONFIG_READERS)
            for function in _functions(tree) if "config" in _parameters(function)]
  assert takers == []


def _imported_modules(name: str, tree) -> set[str]:
  """The modules of the package that module `name` imports (dotted, without the package)."""
  package = ["convnet_jax"] + name.removesuffix(".py").split("/")[:-1]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's own package
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      if base == "convnet_jax" or base.startswith("convnet_jax."):
        for alias in node.names:  # `from convnet_jax.runs import errors` imports a module too
          found.add(f"{base}.{alias.name}".removeprefix("convnet_jax."))
    elif isinstance(node, ast.Import):
      found.update(alias.name.removeprefix("convnet_jax.") for alias in node.names
                   if alias.name.startswith("convnet_jax."))
  return found


def _module_files() -> dict[str, str]:
  """Dotted module name (without the package) -> its path under the package."""
  names = {}
  for name, _ in _modules():
    dotted = name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    names[dotted] = name
  return names


def _import_graph() -> dict[str, set[str]]:
  files = _module_files()
  graph = {}
  for name, tree in _modules():
    targets = set()
    for imported in _imported_modules(name, tree):
      # `from convnet_jax.runs import prepare` names a module; `... import UserError` a name.
      while imported and imported not in files:
        imported = imported.rpartition(".")[0]
      if imported and files[imported] != name and not files[imported].endswith("__init__.py"):
        targets.add(files[imported])
    graph[name] = targets
  return graph


def test_no_import_circle():
  graph = _import_graph()
  circles, state = [], {}

  def visit(node, path):
    state[node] = "open"
    for target in sorted(graph.get(node, ())):
      if state.get(target) == "open":
        circles.append(path[path.index(target):] + [target] if target in path else [node, target])
      elif target not in state:
        visit(target, path + [target])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert circles == []


def test_the_layers_below_runs_never_import_it():
  upward = [(name, target) for name, targets in _import_graph().items()
            if name.startswith(LOWER_LAYERS) for target in targets
            if target.startswith(("runs/", "train.py", "main.py", "sweep/", "tools/"))]
  assert upward == []


def test_no_public_function_takes_more_than_seven_parameters():
  long = [(name, function.name, len(_parameters(function))) for name, tree in _modules()
          for function in _functions(tree)
          if not function.name.startswith("_") and len(_parameters(function)) > MAX_PARAMETERS]
  assert long == []


def test_the_config_has_few_keys_at_its_top_and_the_rest_in_groups():
  config = default_config.get_config()
  top = [key for key in config.keys() if not hasattr(config[key], "keys")]
  assert len(config.keys()) <= MAX_TOP_LEVEL_KEYS, list(config.keys())
  assert sorted(top) == ["batch_size", "num_epochs", "seed"]
