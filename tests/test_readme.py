"""The README's API example runs and prints what its comment says; its quick start is what CI runs."""

import contextlib
import io
import pathlib
import re

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def block(marker, language):
    return re.search(rf"<!-- ci:{marker} -->\n```{language}\n(.*?)```", README, re.S).group(1)


def test_api_example_runs_and_prints_its_comment():
    source = block("example", "python")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "README.md", "exec"), {})
    promised = [line.split("# ")[-1] for line in source.splitlines() if line.startswith("print(")]
    assert printed.getvalue().splitlines() == promised


def test_quick_start_has_two_commands():
    assert block("install", "bash").strip().startswith("pip install")
    assert block("test", "bash").strip() == "pytest"
