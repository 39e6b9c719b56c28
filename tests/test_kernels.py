"""The kernel loader and the check-kernels command, without a GPU (NVRTC only)."""

import concurrent.futures
import hashlib
import subprocess
import sys

import pytest

from oscar_cupy import cli, kernels, nvrtc

try:
    nvrtc.library()
except nvrtc.NVRTCNotFound:
    pytest.skip("NVRTC is not installed (pip install .[cuda13])", allow_module_level=True)

VARIANT = kernels.quantize_variant(128, 2, "bfloat16", "float16")


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OSCAR_CUPY_CACHE_DIR", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def test_compiles_and_caches_on_disk(empty_cache, monkeypatch):
    cubin, _ = kernels.compile_variant(VARIANT, "sm_90")
    assert cubin[:4] == b"\x7fELF"
    files = list(empty_cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("quantize-sm_90-")

    def no_compiler(*args):
        raise AssertionError("compiled again instead of reading the cache")

    monkeypatch.setattr(nvrtc, "compile_cubin", no_compiler)
    assert kernels.compile_variant(VARIANT, "sm_90")[0] == cubin
    with pytest.raises(AssertionError, match="compiled again"):  # another architecture is another entry
        kernels.compile_variant(VARIANT, "sm_80")


def test_the_key_covers_the_source(empty_cache, monkeypatch):
    kernels.compile_variant(VARIANT, "sm_90")
    source = VARIANT.source()
    monkeypatch.setattr(kernels.Variant, "source", lambda self: source + "\n// changed\n")
    kernels.compile_variant(VARIANT, "sm_90")
    assert len(list(empty_cache.iterdir())) == 2


def test_compile_error_names_the_kernel_and_carries_the_log(monkeypatch):
    broken = '#include "common.cuh"\n__global__ void f() { undefined_thing(); }'
    monkeypatch.setattr(kernels.Variant, "source", lambda self: broken)
    with pytest.raises(nvrtc.CompileError) as error:
        kernels.compile_variant(VARIANT, "sm_90")
    message = str(error.value)
    assert "quantize(BITS=2, HEAD_DIM=128, IN_DTYPE=bfloat16, KEY_LANE_ROWS=4, SCALE_DTYPE=float16, VAL_PER=32)" in message
    assert "sm_90" in message and "undefined_thing" in message


COMPILE_AND_PRINT_HASH = (
    "import hashlib; from oscar_cupy import kernels; "
    "v = kernels.quantize_variant(128, 2, 'bfloat16', 'float16'); "
    "print(hashlib.sha256(kernels.compile_variant(v, 'sm_90')[0]).hexdigest())"
)


def test_concurrent_compiles_leave_one_complete_file(empty_cache):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        from_threads = {hashlib.sha256(cubin).hexdigest() for cubin, _ in
                        pool.map(lambda _: kernels.compile_variant(VARIANT, "sm_90"), range(4))}
    for path in empty_cache.iterdir():
        path.unlink()
    processes = [subprocess.Popen([sys.executable, "-c", COMPILE_AND_PRINT_HASH], stdout=subprocess.PIPE, text=True,
                                  cwd=empty_cache.parent) for _ in range(3)]
    from_processes = {process.communicate(timeout=120)[0].strip() for process in processes}
    assert len(from_threads | from_processes) == 1
    assert [path.suffix for path in empty_cache.iterdir()] == [".cubin"]  # no partial files left


def test_every_variant_is_listed_once():
    variants = kernels.all_variants()
    assert len(variants) == len(set(variants))
    assert {v.module for v in variants} == {"quantize", "dequantize", "rotate", "decode", "window"}


def test_check_kernels_command(capsys):
    assert cli.main(["check-kernels", "--arch", "sm_99"]) == 2
    assert "cannot compile for ['sm_99']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["check-kernels", "--jobs", "0"])
    assert cli.main(["info"]) == 0
    assert "NVRTC 1" in capsys.readouterr().out
