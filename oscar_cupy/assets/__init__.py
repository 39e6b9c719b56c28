"""Offline assets for demos and evaluations, fetched once into a cache folder and used offline afterwards.

- :mod:`oscar_cupy.assets.texts`: public-domain books (Jane Austen's novels, Shakespeare's works) as plain text.
- :mod:`oscar_cupy.assets.models`: a transformers model folder (by default SmolLM2-135M-Instruct), converted from GGUF.
- :mod:`oscar_cupy.assets.rdata`: the reader of R's serialization format that the Austen texts need.

This module holds what they share: the cache folder (``$OSCAR_CUPY_DATA_DIR``, default ``~/.cache/oscar_cupy/data``),
:func:`fetch` (a pinned file downloaded once by a command or from a URL, checked against its SHA-256) and
:func:`building` (a folder written under a temporary name and renamed, so that processes working at once never see a
partial one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import urllib.request

COMMAND_TIMEOUT_S = 900


class AssetError(RuntimeError):
    """An asset is not cached and cannot be fetched, or a file does not match its recorded SHA-256."""


@dataclasses.dataclass(frozen=True)
class Download:
    """A pinned file: ``filename``, its ``sha256``, the ``command`` that downloads it into the current folder (tried
    when its program is found) and a ``url`` to fetch it from otherwise, or when the command fails."""

    filename: str
    sha256: str
    command: tuple[str, ...]
    url: str


def data_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache folder: ``cache_dir`` if given, else ``$OSCAR_CUPY_DATA_DIR``, else ``~/.cache/oscar_cupy/data``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    default = pathlib.Path.home() / ".cache" / "oscar_cupy" / "data"
    return pathlib.Path(os.environ.get("OSCAR_CUPY_DATA_DIR", default)).expanduser()


def fetch(download: Download, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The path of ``download``'s file in the cache's ``downloads/`` folder, fetched there first if it is missing.

    The file is checked against ``download.sha256`` every time (a file put there by hand included). Raises
    :class:`AssetError` if it cannot be fetched (the message names the command and URL tried and where to put the file
    by hand) or its SHA-256 differs.
    """
    folder = data_dir(cache_dir) / "downloads"
    path = folder / download.filename
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
            fetched = pathlib.Path(tmp) / download.filename
            failures = _download(download, fetched)
            if failures:
                raise AssetError(
                    f"cannot fetch {download.filename} (offline?):\n  " + "\n  ".join(failures) + "\nTo work "
                    f"offline, download it elsewhere (from {download.url}, or with `{' '.join(download.command)}`) "
                    f"and copy it to {path} (SHA-256 {download.sha256})."
                )
            _check_sha256(fetched, download, "the downloaded file")
            os.replace(fetched, path)
        return path
    _check_sha256(path, download, "the cached file")
    return path


@contextlib.contextmanager
def building(target: pathlib.Path):
    """Yield an empty temporary folder next to ``target``; when the block succeeds, rename it to ``target``.

    If another process created ``target`` meanwhile, its folder is kept and the temporary one removed; if the block
    raises, the temporary folder is removed and ``target`` is not created.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder gets the usual permissions
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256_of(path: pathlib.Path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: pathlib.Path, download: Download, what: str) -> None:
    actual = sha256_of(path)
    if actual != download.sha256:
        raise AssetError(
            f"checksum mismatch for {download.filename}: {what} ({path}) has SHA-256 {actual}, expected "
            f"{download.sha256}; delete it and retry, or put the right file there by hand (from {download.url})"
        )


def _download(download: Download, path: pathlib.Path) -> list[str]:
    """Write ``download``'s file to ``path``: by its command when its program is found, else (or if it fails) from its
    URL. Returns what failed, one line per attempt: empty when the file was written."""
    failures = []
    command = " ".join(download.command)
    if shutil.which(download.command[0]) is None:
        failures.append(f"`{command}`: {download.command[0]} not found")
    else:
        try:
            subprocess.run(download.command, cwd=path.parent, check=True, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT_S)
        except subprocess.CalledProcessError as error:
            failures.append(f"`{command}` exited with {error.returncode}: {error.stderr.strip()[-500:]}")
        except (OSError, subprocess.TimeoutExpired) as error:
            failures.append(f"`{command}` failed: {error}")
        else:
            if path.is_file():
                return []
            failures.append(f"`{command}` succeeded but wrote no {download.filename}")
    try:
        with urllib.request.urlopen(download.url, timeout=60) as response, open(path, "wb") as file:
            shutil.copyfileobj(response, file)
        return []
    except OSError as error:  # URLError and HTTPError are OSErrors
        return failures + [f"{download.url}: {error}"]
