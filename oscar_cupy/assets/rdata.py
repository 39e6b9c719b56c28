"""A small reader of R's serialization format, enough to read the data of R packages without R.

:func:`unserialize` reads R's XDR binary serialization (``"X\\n"`` header, versions 2 and 3) of the object types that
data files use: ``NULL``, symbols, pairlists, lists, character vectors (with ``NA`` and the UTF-8, latin1 and ASCII
encoding flags), integer, logical and double vectors, attributes, references, minimal environments and the ALTREP
compact sequences and wrappers. Any other object type raises ``ValueError`` naming its SEXP type; data that ends early
raises ``ValueError`` too.

:func:`read_rds` reads an ``.rds`` file (``saveRDS``: gzip, bzip2, xz or no compression) and :func:`read_lazyload` the
variables of a lazy-load database (an ``.rdb``/``.rdx`` pair, as in ``data/Rdata.rdb`` of an installed package) as plain
Python values (:func:`to_python`).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import pathlib
import struct
import zlib

SEXP_TYPES = {
    0: "NILSXP", 1: "SYMSXP", 2: "LISTSXP", 3: "CLOSXP", 4: "ENVSXP", 5: "PROMSXP", 6: "LANGSXP", 7: "SPECIALSXP",
    8: "BUILTINSXP", 9: "CHARSXP", 10: "LGLSXP", 13: "INTSXP", 14: "REALSXP", 15: "CPLXSXP", 16: "STRSXP",
    17: "DOTSXP", 18: "ANYSXP", 19: "VECSXP", 20: "EXPRSXP", 21: "BCODESXP", 22: "EXTPTRSXP", 23: "WEAKREFSXP",
    24: "RAWSXP", 25: "S4SXP", 238: "ALTREP_SXP", 239: "ATTRLISTSXP", 240: "ATTRLANGSXP", 241: "BASEENV_SXP",
    242: "EMPTYENV_SXP", 243: "BCREPREF", 244: "BCREPDEF", 245: "GENERICREFSXP", 246: "CLASSREFSXP",
    247: "PERSISTSXP", 248: "PACKAGESXP", 249: "NAMESPACESXP", 250: "BASENAMESPACE_SXP", 251: "MISSINGARG_SXP",
    252: "UNBOUNDVALUE_SXP", 253: "GLOBALENV_SXP", 254: "NILVALUE_SXP", 255: "REFSXP",
}
VECTOR_TYPES = {10: "logical", 13: "integer", 14: "double", 16: "character", 19: "list", 20: "expression"}
SPECIAL_ENVIRONMENTS = {253: "R_GlobalEnv", 242: "R_EmptyEnv", 241: "R_BaseEnv", 250: "R_BaseNamespace"}
NA_INTEGER = -(2**31)
RAW_LZMA2 = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 26}]  # R_compress3's raw LZMA2 stream; 64 MiB fits any preset
HAS_ATTRIBUTES, HAS_TAG = 1 << 9, 1 << 10
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6


@dataclasses.dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name), as found in tags and in the class of an ALTREP object."""

    name: str


class RVector(list):
    """An R vector or pairlist: a list of its elements, with ``rtype`` (``"character"``, ``"integer"``, ``"double"``,
    ``"logical"``, ``"list"``, ``"expression"`` or ``"pairlist"``) and ``attributes`` (name → value).

    ``NA`` elements are ``None``, except in double vectors, where ``NA`` and ``NaN`` are both ``math.nan``.
    A pairlist's tags are its ``"names"`` attribute (``""`` where an element has none), as ``as.list`` gives in R.
    """

    def __init__(self, rtype: str, values=(), attributes: dict | None = None):
        super().__init__(values)
        self.rtype = rtype
        self.attributes = attributes if attributes is not None else {}

    def __repr__(self) -> str:
        attributes = f", attributes={self.attributes!r}" if self.attributes else ""
        return f"RVector({self.rtype!r}, {list.__repr__(self)}{attributes})"


@dataclasses.dataclass(eq=False)
class REnvironment:
    """An R environment: ``name`` for the global, base, empty and namespace environments, else its ``variables``."""

    name: str | None = None
    variables: dict = dataclasses.field(default_factory=dict)
    enclosure: "REnvironment | None" = None
    attributes: dict = dataclasses.field(default_factory=dict)


def unserialize(data: bytes) -> object:
    """The object serialized in ``data`` (R's XDR format, no compression), as :class:`RVector`, :class:`RSymbol`,
    :class:`REnvironment` or ``None`` (R's ``NULL``).

    Raises ``ValueError`` for other formats (ASCII, native binary), other versions, unsupported SEXP types (named in the
    message), data that ends early and bytes left over at the end.
    """
    return _Reader(bytes(data)).read()


def read_rds(path: str | pathlib.Path) -> object:
    """The object in an ``.rds`` file written by ``saveRDS`` (gzip, bzip2, xz or uncompressed), as :func:`unserialize`
    returns it."""
    return unserialize(_decompress_file(pathlib.Path(path).read_bytes()))


def read_lazyload(rdb_path: str | pathlib.Path, rdx_path: str | pathlib.Path) -> dict[str, object]:
    """Every variable of the lazy-load database ``rdb_path`` with index ``rdx_path``: name → :func:`to_python` value.

    The index (``.rdx``) is an ``.rds`` file holding ``list(variables = list(name = c(offset, length), ...),
    references, compressed)``; each variable is ``length`` bytes at ``offset`` of the ``.rdb``: a 4-byte big-endian
    uncompressed length, then zlib data (``compressed`` TRUE), or a type byte and zlib, bzip2, xz or raw data
    (``compressed`` 2 or 3). Raises ``ValueError`` if the index does not have that shape or an entry is damaged.
    """
    index = _as_dict(read_rds(rdx_path), "rdx_path")
    variables = _as_dict(index.get("variables"), "rdx_path: variables")
    compressed = index.get("compressed")
    if not isinstance(compressed, RVector) or len(compressed) != 1:
        raise ValueError(f"rdx_path: {rdx_path} has no 'compressed' field of length 1")
    rdb = pathlib.Path(rdb_path).read_bytes()
    result = {}
    for name, where in variables.items():
        if not isinstance(where, RVector) or where.rtype != "integer" or len(where) != 2 or None in where:
            raise ValueError(f"rdx_path: variable {name!r} has no (offset, length) pair: {where!r}")
        offset, length = where
        if offset < 0 or length < 0 or offset + length > len(rdb):
            raise ValueError(f"rdb_path: variable {name!r} at {offset}+{length} lies beyond the end ({len(rdb)} bytes)")
        try:
            payload = _decompress_entry(rdb[offset:offset + length], compressed[0])
        except (zlib.error, OSError, lzma.LZMAError) as error:
            raise ValueError(f"rdb_path: variable {name!r} does not decompress: {error}") from error
        result[name] = to_python(unserialize(payload))
    return result


def to_python(obj: object) -> object:
    """``obj`` (as :func:`unserialize` returns it) as plain Python values.

    Named lists and pairlists become ``dict`` (data frames too: column name → column), factors lists of their labels
    (``None`` for ``NA``), other vectors ``list`` (list elements converted in turn); symbols, environments and
    ``None`` are kept.
    """
    if not isinstance(obj, RVector):
        return obj
    classes = obj.attributes.get("class") or []
    names = obj.attributes.get("names")
    if "factor" in classes:
        levels = obj.attributes.get("levels") or []
        return [None if code is None else levels[code - 1] for code in obj]
    values = [to_python(item) for item in obj] if obj.rtype in ("list", "expression", "pairlist") else list(obj)
    if names is not None and obj.rtype in ("list", "pairlist"):  # data frames included: lists of named columns
        return dict(zip(names, values))
    return values


def _as_dict(obj: object, argument: str) -> dict:
    if not isinstance(obj, RVector) or obj.rtype not in ("list", "pairlist") or "names" not in obj.attributes:
        raise ValueError(f"{argument}: expected a named R list, got {obj!r:.200}")
    return dict(zip(obj.attributes["names"], obj))


def _decompress_file(raw: bytes) -> bytes:
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


def _decompress_entry(raw: bytes, compressed: object) -> bytes:
    """One ``.rdb`` entry: R's ``R_decompress1`` (zlib) for TRUE/1, ``R_decompress2``/``3`` (typed) for 2 and 3."""
    if compressed in (False, 0):
        return raw
    if len(raw) < 4:
        raise ValueError(f"truncated R data: a lazy-load entry of {len(raw)} bytes has no length header")
    (length,) = struct.unpack_from(">I", raw)
    if compressed in (True, 1):
        out = zlib.decompress(raw[4:])
    elif compressed in (2, 3):
        kind, body = raw[4:5], raw[5:]
        if kind == b"0":
            out = body
        elif kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z" and compressed == 3:
            out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=RAW_LZMA2)
        else:
            raise ValueError(f"unknown lazy-load compression type byte {kind!r} (compressed={compressed})")
    else:
        raise ValueError(f"unknown lazy-load compression {compressed!r}; expected TRUE, FALSE, 2 or 3")
    if len(out) != length:
        raise ValueError(f"lazy-load entry decompressed to {len(out)} bytes, its header says {length}")
    return out


class _Reader:
    """One pass over a serialized object; ``refs`` is R's reference table (symbols and environments)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []
        self.native_encoding = "UTF-8"

    def read(self) -> object:
        if self.take(2) != b"X\n":
            raise ValueError(f"not R XDR serialization: header {self.data[:2]!r}, expected b'X\\n' (ASCII and native "
                             "binary formats are not supported)")
        version = self.int()
        self.take(8)  # the writer's R version and the oldest R version that can read it
        if version == 3:
            self.native_encoding = self.take(self.int()).decode("ascii")
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported (only 2 and 3)")
        obj = self.item()
        if self.pos != len(self.data):
            raise ValueError(f"{len(self.data) - self.pos} bytes left after the serialized object")
        return obj

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated R data: {n} bytes needed at offset {self.pos}, "
                             f"{len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) + lower
        elif n < -1:
            raise ValueError(f"negative vector length {n} at offset {self.pos - 4}")
        return n

    def item(self) -> object:
        flags = self.int()
        sexp = flags & 0xFF
        if sexp == 254:
            return None
        if sexp in SPECIAL_ENVIRONMENTS:
            return REnvironment(name=SPECIAL_ENVIRONMENTS[sexp])
        if sexp == 255:
            index = (flags >> 8) or self.int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"REFSXP to reference {index}, but only {len(self.refs)} are defined")
            return self.refs[index - 1]
        if sexp in (248, 249):
            if self.int() != 0:
                raise ValueError(f"{SEXP_TYPES[sexp]} with named strings is not supported")
            parts = [self.item() for _ in range(self.length())]
            env = REnvironment(name=f"namespace:{parts[0]}" if sexp == 249 else str(parts[0]))
            self.refs.append(env)
            return env
        if sexp == 1:
            symbol = RSymbol(self.item())
            self.refs.append(symbol)
            return symbol
        if sexp == 2:
            return self.pairlist(flags)
        if sexp == 4:
            return self.environment()
        if sexp == 9:
            return self.string(flags)
        if sexp == 238:
            return self.altrep()
        if sexp not in VECTOR_TYPES:
            raise ValueError(f"unsupported R object type {SEXP_TYPES.get(sexp, 'unknown')} (SEXP type {sexp}) at "
                             f"offset {self.pos - 4}")
        vector = RVector(VECTOR_TYPES[sexp], self.vector_values(sexp))
        if flags & HAS_ATTRIBUTES:
            vector.attributes = self.attributes()
        return vector

    def vector_values(self, sexp: int) -> list:
        n = self.length()
        if sexp in (10, 13):
            values = struct.unpack(f">{n}i", self.take(4 * n))
            if sexp == 10:
                return [None if v == NA_INTEGER else bool(v) for v in values]
            return [None if v == NA_INTEGER else v for v in values]
        if sexp == 14:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        return [self.item() for _ in range(n)]  # character (CHARSXP elements), list, expression

    def string(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        levels = flags >> 12
        if levels & BYTES_MASK:
            raise ValueError(f"a string marked as bytes (no encoding) at offset {self.pos - n}: {raw[:40]!r}")
        encoding = ("utf-8" if levels & UTF8_MASK else "latin-1" if levels & LATIN1_MASK
                    else "ascii" if levels & ASCII_MASK else self.native_encoding)
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as error:
            raise ValueError(f"string at offset {self.pos - n} does not decode as {encoding}: {error}") from error

    def attributes(self) -> dict:
        return _tagged(self.item())

    def pairlist(self, flags: int) -> RVector:
        """A LISTSXP chain, read iteratively; attributes of the first cell become the result's attributes."""
        values, tags, attributes = [], [], {}
        while True:
            if flags & HAS_ATTRIBUTES:
                cell_attributes = self.attributes()
                if not values:
                    attributes = cell_attributes
            tag = self.item() if flags & HAS_TAG else None
            tags.append(tag.name if isinstance(tag, RSymbol) else "")
            values.append(self.item())
            flags = self.int()
            if flags & 0xFF == 254:
                break
            if flags & 0xFF != 2:
                raise ValueError(f"a pairlist ends in {SEXP_TYPES.get(flags & 0xFF, 'unknown')}, not NULL")
        if any(tags):
            attributes = {"names": tags, **attributes}
        return RVector("pairlist", values, attributes)

    def environment(self) -> REnvironment:
        env = REnvironment()
        self.refs.append(env)  # registered before its contents, which may refer to it
        self.int()  # locked
        enclosure, frame, hashtab = self.item(), self.item(), self.item()
        env.attributes = _tagged(self.item())
        if enclosure is not None and not isinstance(enclosure, REnvironment):
            raise ValueError(f"an environment's enclosure must be an environment, got {enclosure!r:.200}")
        env.enclosure = enclosure
        chains = [frame] + (list(hashtab) if isinstance(hashtab, RVector) else [])
        for chain in chains:
            if isinstance(chain, RVector):
                env.variables.update(zip(chain.attributes.get("names", []), chain))
        return env

    def altrep(self) -> RVector:
        """An ALTREP object: compact integer/real sequences are expanded, wrappers unwrapped; others are refused."""
        info, state, attributes = self.item(), self.item(), self.item()
        name = info[0].name if isinstance(info, RVector) and info and isinstance(info[0], RSymbol) else repr(info)
        if name in ("compact_intseq", "compact_realseq") and isinstance(state, RVector) and len(state) == 3:
            n, start, step = state
            if name == "compact_intseq":
                vector = RVector("integer", range(int(start), int(start) + int(n) * int(step), int(step)))
            else:
                vector = RVector("double", (start + i * step for i in range(int(n))))
        elif name.startswith("wrap_") and isinstance(state, RVector) and state and isinstance(state[0], RVector):
            vector = state[0]
        else:
            raise ValueError(f"unsupported ALTREP class {name!r} (ALTREP_SXP) at offset {self.pos}")
        vector.attributes = _tagged(attributes)
        return vector


def _tagged(pairlist: object) -> dict:
    """A pairlist of attributes as a dict (tag → value); ``{}`` for ``NULL``."""
    if pairlist is None:
        return {}
    if not isinstance(pairlist, RVector) or pairlist.rtype != "pairlist" or "names" not in pairlist.attributes:
        raise ValueError(f"attributes must be a tagged pairlist, got {pairlist!r:.200}")
    return dict(zip(pairlist.attributes["names"], pairlist))
