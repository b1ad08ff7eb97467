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


def test_schedule_md_prints_the_current_plan():
    import numpy as np
    from test_schedule import VIEWS, lstm  # one LSTM cell program, at the docs' sizes here

    import gdsl
    from gdsl.schedule import schedule

    args = (np.zeros((64, 1, 256), np.float32), np.zeros((256, 1024), np.float32),
            np.zeros((256, 1024), np.float32), np.zeros(1024, np.float32))
    printed = re.search(r"```\n(plan: control=device.*?)```", (DOCS / "schedule.md").read_text(), re.S).group(1)
    assert printed.strip() == str(schedule(gdsl.make_ir(lstm)(*args), grid=132, views=VIEWS)).strip()


def test_guide_names_every_jit_option():
    """The guide's sentence listing jit's options names exactly the options jit accepts, and each but the
    backend-specific ones (`block`, and `arch` / `wave` on hip) has its own bullet."""
    import importlib
    known = importlib.import_module("gdsl.jit").KNOWN_OPTIONS
    text = (DOCS / "guide.md").read_text()
    sentence = text[text.index("with the options\n"):text.index("any other name is a")]
    assert set(re.findall(r"`(\w+)`", sentence)) == known
    bullets = set(re.findall(r"^- `(\w+)", text, re.M))
    assert known - bullets == {"arch", "block", "wave"}
