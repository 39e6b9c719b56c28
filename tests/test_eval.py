"""``oscar-cupy eval`` on a tiny random model and a local text: the runs, the JSON/markdown/plots it writes, exit codes
and error messages."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_model import text_file, tiny_model_folder  # noqa: E402, F401  (fixtures)

from oscar_cupy import cli  # noqa: E402

SMALL = ["--contexts", "64,128", "--presets", "bf16,oscar-2,kivi-4", "--window", "32", "--prompt-tokens", "16",
         "--chunk", "16", "--passkey-contexts", "96", "--passkey-depths", "0.2,0.8", "--agreement-tokens", "6",
         "--device", "cpu"]


def test_eval_writes_json_markdown_and_plots(tiny_model_folder, text_file, tmp_path, capsys):
    out = tmp_path / "results"
    code = cli.main(["eval", "--model", str(tiny_model_folder), "--texts", str(text_file), "--out", str(out), *SMALL])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((out / "eval.json").read_text())
    assert result["command"].startswith("oscar-cupy eval --model")
    assert set(result) >= {"command", "model", "device", "date", "settings", "versions", "bits_per_element", "perplexity",
                           "passkey", "agreement"}
    assert result["device"] == "cpu" and result["settings"]["contexts"] == [64, 128]
    assert [(r["context"], r["preset"]) for r in result["perplexity"]] == [
        (64, "bf16"), (64, "oscar-2"), (64, "kivi-4"), (128, "bf16"), (128, "oscar-2"), (128, "kivi-4")]
    assert all(r["perplexity"] > 1 for r in result["perplexity"])
    assert len(result["passkey"]) == 6 and all(isinstance(r["found"], bool) for r in result["passkey"])
    agreement = {r["preset"]: r["leading_equal"] for r in result["agreement"]}
    assert agreement["bf16"] == 6 and set(agreement) == {"bf16", "oscar-2", "kivi-4"}
    bits = result["bits_per_element"]
    assert bits["bf16"] == 16 and 3 < bits["oscar-2"] < 3.5 and bits["kivi-4"] == 5  # kivi: no token norms
    table = (out / "eval.md").read_text()
    assert "| text | context | bf16 | oscar-2 | kivi-4 |" in table and "Passkey" in table and table in captured.out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "perplexity.png").stat().st_size > 1000 and (out / "bits.png").stat().st_size > 1000


def test_runs_over_different_texts_merge_into_one_result(tiny_model_folder, text_file, tmp_path):
    """Two runs side by side (different texts) merge into one result: rows concatenated, passkey and agreement rows
    labelled with their text, the agreement table a row per text."""
    from oscar_cupy import evaluation

    second = tmp_path / "second.txt"
    second.write_text(text_file.read_text()[::-1])
    results = []
    for name, text in (("a", text_file), ("b", second)):
        assert cli.main(["eval", "--model", str(tiny_model_folder), "--texts", str(text), "--out",
                         str(tmp_path / name), "--no-plots", *SMALL]) == 0
        results.append(json.loads((tmp_path / name / "eval.json").read_text()))
    merged = evaluation.merge(results)
    assert merged["settings"]["texts"] == [str(text_file), str(second)]
    assert len(merged["perplexity"]) == 12 and len(merged["passkey"]) == 12 and len(merged["agreement"]) == 6
    assert {r["text"] for r in merged["agreement"]} == {str(text_file), str(second)}
    table = evaluation.markdown(merged)
    assert "| 96 | " in table and "/4 |" in table  # passkey: two depths x two texts
    assert f"| {second} | 6/6 |" in table


@pytest.mark.parametrize("option", [["--presets", "oscar-3"], ["--contexts", "0"], ["--contexts", "a,b"],
                                    ["--passkey-depths", "deep"], ["--device", "tpu"], ["--groups", "48"]])
def test_bad_options_exit_2(option):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *option])
    assert exit_info.value.code == 2


def test_errors_exit_1_with_a_message(tiny_model_folder, text_file, tmp_path, capsys, monkeypatch):
    base = ["eval", "--model", str(tiny_model_folder), "--out", str(tmp_path), *SMALL]
    assert cli.main([*base, "--texts", str(text_file), "--contexts", "100000"]) == 1
    assert "100000 are needed" in capsys.readouterr().err
    from oscar_cupy.assets import texts

    monkeypatch.setattr(texts, "austen_books", lambda cache_dir=None: {"emma": "text"})
    assert cli.main([*base, "--texts", "austen:nosuchbook"]) == 1
    assert "austen has no 'nosuchbook'" in capsys.readouterr().err
