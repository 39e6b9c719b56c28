"""Installed, everything lives under the one import name oscar_cupy: nothing else lands in site-packages."""

import importlib.metadata
import json

import pytest


@pytest.fixture
def files():
    distribution = importlib.metadata.distribution("oscar-cupy")
    direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable") or distribution.read_text("RECORD") is None:
        pytest.skip("not installed from a wheel (an editable install, or metadata found in the source tree)")
    return distribution.files


def test_installed_files_live_under_oscar_cupy(files):
    in_site_packages = {file.parts[0] for file in files if file.parts[0] != ".."}  # not scripts in bin/
    assert all(name == "oscar_cupy" or name.endswith(".dist-info") for name in in_site_packages), in_site_packages
    installed = {str(file) for file in files}
    assert {"oscar_cupy/adapters/torch.py", "oscar_cupy/cpu_kernels.py"} <= installed  # adapters/ mapped inside
