"""``oscar-cupy demo`` on a tiny random model and a local text: the whole path, its report and its error paths."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from oscar_cupy import cli  # noqa: E402

WORDS = "the a of and to in was her she he it that not be his had with for as but you my".split()


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    generator = torch.Generator().manual_seed(1)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=generator)]
    path.write_text("\n\n".join(" ".join(words[i : i + 50]) for i in range(0, len(words), 50)))
    return path


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


@pytest.mark.parametrize("arguments", [["demo", "--preset", "oscar-3"], ["demo", "--new-tokens", "0"], ["nonsense"]])
def test_bad_options_exit_2(arguments):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(arguments)
    assert exit_info.value.code == 2
