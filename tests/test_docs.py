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
