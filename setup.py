"""Builds the optional oneDNN convolution extension (`convnet_jax/ops/csrc/onednn_conv.cc`).

Everything else about the package is in pyproject.toml. The extension is an XLA FFI library
(headers from jaxlib, as `jax.ffi.include_dir()` gives them) linked against oneDNN from the
CPU-only PyPI wheels (`onednn-devel-cpu-gomp` for headers, `onednn-cpu-gomp` for libdnnl.so.3).
Where it cannot be built (another OS or CPU, no C++ compiler, no oneDNN wheel) the install goes
on without it and `convnet_jax` runs its pure-JAX convolutions.
"""

import importlib.metadata
import importlib.util
import os
import platform
import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

EXTENSION = "convnet_jax.ops._onednn_conv"


def _distribution_file(distribution: str, name: str) -> str:
  """The installed path of the file `name` (a path suffix) of a distribution."""
  for file in importlib.metadata.files(distribution) or []:
    if ("/" + str(file).replace("\\", "/")).endswith(name):
      return str(file.locate())
  raise FileNotFoundError(f"{distribution} holds no {name}")


def _configure(extension: Extension) -> None:
  """Points the extension at the XLA FFI headers and at oneDNN's headers and library."""
  if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
    raise RuntimeError(f"built only for Linux x86-64, not {sys.platform} {platform.machine()}")
  jaxlib = importlib.util.find_spec("jaxlib")
  if jaxlib is None:
    raise RuntimeError("jaxlib (for the XLA FFI headers) is not installed in the build env")
  ffi_include = os.path.join(list(jaxlib.submodule_search_locations)[0], "include")
  dnnl_header = _distribution_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
  dnnl_library = _distribution_file("onednn-cpu-gomp", "/libdnnl.so.3")
  dnnl_include = os.path.dirname(os.path.dirname(os.path.dirname(dnnl_header)))
  # -isystem: the libraries' own headers are not ours to warn about.
  extension.extra_compile_args += ["-isystem", ffi_include, "-isystem", dnnl_include]
  # Linked by soname only: at run time `convnet_jax.ops.onednn` loads the wheel's libdnnl.so.3 first
  # (RTLD_GLOBAL), wherever pip put it, and the loader reuses that copy.
  extension.extra_link_args += [f"-L{os.path.dirname(dnnl_library)}", "-l:libdnnl.so.3"]


class OptionalBuildExt(build_ext):
  """build_ext that leaves out, with a warning, an extension that cannot be built."""

  def build_extensions(self):
    built = []
    for extension in self.extensions:
      try:
        _configure(extension)
        self.build_extension(extension)
        built.append(extension)
      except Exception as error:  # any failure: install without it, say why
        print(f"WARNING: not building {extension.name} ({type(error).__name__}: {error}); "
              f"convnet_jax will use its pure-JAX convolutions", file=sys.stderr)
    self.extensions = built


setup(
    ext_modules=[Extension(
        EXTENSION, sources=["convnet_jax/ops/csrc/onednn_conv.cc"], language="c++",
        extra_compile_args=["-std=c++17", "-O2"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
