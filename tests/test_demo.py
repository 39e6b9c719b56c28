"""``oscar-cupy demo`` on a tiny random model and a local text: the whole path, its report and its error paths."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tiny_model import text_file, tiny_model_folder  # noqa: E402, F401  (fixtures)

from oscar_cupy import cli  # noqa: E402


def test_demo_runs_and_reports_both_caches(tiny_model_folder, text_file, capsys):
    code = cli.main(["demo", "--model", str(tiny_model_folder), "--text", str(text_file), "--prompt-tokens", "100",
                     "--new-tokens", "8", "--eval-tokens", "70", "--window", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--- bf16 continuation ---" in out and "--- oscar-2 continuation ---" in out
    table = out.split("perplexity")[-1].splitlines()
    rows = {line.split()[0]: line.split() for line in table if line.split()[:1] in (["bf16"], ["oscar-2"])}
    assert float(rows["bf16"][2].rstrip("x")) == 1.0 and float(rows["oscar-2"][2].rstrip("x")) > 1.5
    assert all(float(row[3]) > 1 for row in rows.values())  # perplexities


@pytest.mark.parametrize("arguments, message", [
    (["--text", "austen:nosuchbook"], "austen has no 'nosuchbook'"),
    (["--text", "/no/such/file.txt"], "neither a file nor one of"),
    pytest.param(["--device", "cuda"], "no usable CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is there")),
    (["--prompt-tokens", "5000"], "need"),
])
def test_demo_errors_exit_1_with_a_message(tiny_model_folder, text_file, capsys, monkeypatch, arguments, message):
    from oscar_cupy.assets import texts

    monkeypatch.setattr(texts, "austen_books", lambda cache_dir=None: {"emma": "text"})
    base = ["demo", "--model", str(tiny_model_folder), "--text", str(text_file)]
    assert cli.main(base + arguments) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["demo", "--preset", "oscar-3"], ["demo", "--new-tokens", "0"], ["nonsense"],
                                       ["demo", "--bits", "3"], ["demo", "--groups", "16"]])
def test_bad_options_exit_2(arguments):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(arguments)
    assert exit_info.value.code == 2


def test_bits_groups_and_window_change_the_preset():
    from oscar_cupy import QuantConfig
    from oscar_cupy.demo import config_changes

    args = cli.parser().parse_args(["demo", "--preset", "kivi-2", "--bits", "4", "--groups", "128", "--window", "512"])
    config = QuantConfig.preset(args.preset, **config_changes(args))
    assert config == QuantConfig.preset("kivi-4", key_group=128, value_group=128, window=512)
    args = cli.parser().parse_args(["eval", "--groups", "64"])
    assert config_changes(args) == {"key_group": 64, "value_group": 64}
    assert config_changes(cli.parser().parse_args(["demo"])) == {}
