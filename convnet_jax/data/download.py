"""Finds or fetches the CIFAR-10 binary files, with no TensorFlow: the per-user cache folder, a
one-time download of the published `cifar-10-binary.tar.gz` (size and SHA-256 checked, written
under a temporary name and renamed only when complete), and its unpacking with `tarfile`."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from convnet_jax.errors import create_folder
from convnet_jax.errors import UserError

# The published archive, as tensorflow-datasets records it (url_checksums/cifar10.txt).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
# The folder of the binary files when config.data.dir is empty (else the per-user cache).
DATA_DIR_ENV = "CONVNET_JAX_DATA_DIR"
# Seconds to wait for the host to answer or send more bytes: offline, the error comes at once
# (refused, no route, no DNS) or after this long.
NETWORK_TIMEOUT_SECONDS = 5
# The way out when the cache folder cannot be written.
CACHE_ADVICE = (f"set config.data.dir (or ${DATA_DIR_ENV}) to a folder with the CIFAR-10 "
                f"binary files, or XDG_CACHE_HOME to a folder that can be written")
_CHUNK_BYTES = 1 << 20


class DownloadError(UserError):
  """The archive could not be fetched or verified; the message says how to proceed offline."""


def user_cache_folder() -> Path:
  """The package's per-user cache folder: $XDG_CACHE_HOME/convnet_jax, else
  ~/.cache/convnet_jax (the data and the compiled programs go below it)."""
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "convnet_jax"


def default_data_dir() -> Path:
  """$CONVNET_JAX_DATA_DIR, else $XDG_CACHE_HOME/convnet_jax/cifar10 (~/.cache/...)."""
  if os.environ.get(DATA_DIR_ENV):
    return Path(os.environ[DATA_DIR_ENV])
  return user_cache_folder() / "cifar10"


def _offline_hint(folder: Path) -> str:
  return (f"Offline, set config.data.dir to a folder with the CIFAR-10 binary files, or put "
          f"{ARCHIVE_NAME} into {folder}")


def file_sha256(path: Path) -> str:
  """The SHA-256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with path.open("rb") as file:
    for chunk in iter(lambda: file.read(_CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _progress(total: int | None):
  import tqdm  # imported here: only a download draws one

  return tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   desc=ARCHIVE_NAME, mininterval=1.0)


def download(url: str, destination: Path, sha256: str) -> None:
  """Fetches `url` to `destination`: streamed into `destination.part` with a progress bar (size,
  rate, ETA), its SHA-256 checked, then renamed. A failed or refused download leaves nothing
  behind; a `.part` left by a killed one is started over."""
  partial = destination.with_name(destination.name + ".part")
  digest = hashlib.sha256()
  print(f"downloading {url} to {destination}", file=sys.stderr)
  try:
    with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_SECONDS) as response:
      length = response.headers.get("Content-Length")
      with partial.open("wb") as file, _progress(int(length) if length else None) as bar:
        # read1: whatever has arrived (up to a chunk), so the file and the bar move as it comes.
        for chunk in iter(lambda: response.read1(_CHUNK_BYTES), b""):
          file.write(chunk)
          digest.update(chunk)
          bar.update(len(chunk))
      if length is not None and partial.stat().st_size != int(length):
        raise DownloadError(f"{url}: the connection closed after {partial.stat().st_size} of "
                            f"{length} bytes. {_offline_hint(destination.parent)}")
  except (urllib.error.URLError, OSError) as error:
    partial.unlink(missing_ok=True)
    reason = getattr(error, "reason", error)
    raise DownloadError(f"could not download {url} ({reason}). "
                        f"{_offline_hint(destination.parent)}") from None
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  if digest.hexdigest() != sha256:
    partial.unlink()
    raise DownloadError(f"{url}: SHA-256 {digest.hexdigest()}, expected {sha256}; the download "
                        f"is corrupt and was removed. {_offline_hint(destination.parent)}")
  partial.replace(destination)


def unpack(archive: Path, folder: Path, names) -> None:
  """Writes the members of `archive` named `names` (wherever they sit in it) into `folder`,
  each under a temporary name renamed when complete."""
  try:
    with tarfile.open(archive, "r:gz") as tar:
      members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
      missing = [name for name in names if name not in members]
      if missing:
        raise DownloadError(f"{archive}: holds no {', '.join(missing)}; not the CIFAR-10 binary "
                            f"archive")
      for name in names:
        target = folder / name
        partial = target.with_name(name + ".part")
        with tar.extractfile(members[name]) as source, partial.open("wb") as file:
          shutil.copyfileobj(source, file, _CHUNK_BYTES)
        partial.replace(target)
  except (tarfile.TarError, EOFError, OSError) as error:
    raise DownloadError(f"{archive}: cannot be unpacked ({error}); remove it and run again, or "
                        f"set config.data.dir") from None


def ensure_cifar10(folder: Path, names, url: str = CIFAR10_URL,
                   sha256: str = CIFAR10_SHA256) -> Path:
  """The folder holding the binary files `names`, fetching and unpacking the archive into it
  the first time. An archive already in the folder (dropped there by hand, offline) is used
  after its checksum passes; a corrupt one is removed."""
  folder = Path(folder)
  if all((folder / name).is_file() for name in names):
    return folder
  create_folder(folder, "the data cache", CACHE_ADVICE)
  archive = folder / ARCHIVE_NAME
  if archive.is_file():
    if file_sha256(archive) != sha256:
      archive.unlink()
      raise DownloadError(f"{archive}: SHA-256 does not match the published archive's "
                          f"({sha256}); it was removed. Run again to download it, or "
                          f"set config.data.dir")
  else:
    start = time.perf_counter()
    download(url, archive, sha256)
    print(f"downloaded {archive.stat().st_size / 1e6:.1f} MB in "
          f"{time.perf_counter() - start:.1f} s; unpacking", file=sys.stderr)
  unpack(archive, folder, names)
  archive.unlink()  # the unpacked files are the cache
  return folder
