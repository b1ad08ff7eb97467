"""The documentation's Python examples run as written (docs stay true to the code)."""
import pathlib
import re


DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def _blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_guide_examples_run(capsys):
    namespace = {}
    blocks = _blocks(DOCS / "guide.md")
    assert len(blocks) >= 8
    for block in blocks:  # the blocks build on each other, like a notebook
        exec(compile(block, str(DOCS / "guide.md"), "exec"), namespace)
