"""The exercise machinery: the generator, the exercise notebooks it writes, and `python -m minivlm check`.

Generic over every lesson: each solutions/NN_*.ipynb found is checked, so a new lesson is covered the
moment its notebook exists. Each lesson's own self-checks are tested in tests/test_exercises_lessonNN.py.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from minivlm.__main__ import main
from minivlm.exercises import ExerciseNotDone, fail, lesson_checks
from minivlm.exercises import generate as gen
from minivlm.exercises.run import CellError, code_cells, execute, new_namespace

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def write(path: Path, cells: list) -> Path:
    """A notebook of cells: strings are code cells (with a stale output), ("md", text) markdown cells."""
    nb = new_notebook(cells=[
        new_markdown_cell(c[1]) if isinstance(c, tuple)
        else new_code_cell(c, execution_count=7, outputs=[new_output("stream", name="stdout", text="old\n")])
        for c in cells
    ])  # fmt: skip
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# The real notebooks ------------------------------------------------------------------------------------


def test_exercises_are_generated_from_the_current_solutions():
    assert gen.stale(ROOT) == [], "run `python -m minivlm.exercises.generate`"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_exercise_has_a_check_and_every_check_an_exercise(solution):
    notebook = json.loads(solution.read_text(encoding="utf-8"))
    ids = gen.exercise_ids(notebook, solution.name)
    assert ids, f"{solution.name} has no exercise"
    assert set(ids) == set(lesson_checks(int(solution.name[:2]))), "CHECKS and the notebook's exercises differ"
    cells = code_cells(solution)
    for exercise in ids:
        answer = next(i for i, cell in enumerate(cells) if cell.exercise == exercise)
        assert any(exercise in cell.checks for cell in cells[answer + 1 :]), f"no check({exercise!r}) cell"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_an_exercise_notebook_stops_at_its_first_blank(solution, monkeypatch):
    first = gen.exercise_ids(json.loads(solution.read_text(encoding="utf-8")))[0]
    exercise = ROOT / "exercises" / solution.name
    monkeypatch.chdir(exercise.parent)  # where Jupyter would run it
    with pytest.raises(CellError) as stopped:
        execute(code_cells(exercise), new_namespace())
    assert isinstance(stopped.value.error, NotImplementedError), stopped.value
    assert str(stopped.value.error).startswith(f"Exercise {first}"), stopped.value
    assert first in stopped.value.cell.checks  # at the check cell, not before it


# The generator, on small notebooks ---------------------------------------------------------------------

SOLUTION_CELL = '''# Exercise 3.1: a "quoted" title
class Model:
    def forward(self, x):
        """Keep this docstring."""
        ### BEGIN SOLUTION
        return x + 1
        ### END SOLUTION

    def twice(self, x):
        ### BEGIN SOLUTION
        return 2 * x
        ### END SOLUTION
'''


def test_blanks_keep_the_indentation_and_everything_else(tmp_path):
    (tmp_path / "solutions").mkdir()
    cells = [("md", "# Lesson 03"), "import math", SOLUTION_CELL, 'check("3.1", Model)']
    write(tmp_path / "solutions" / "03_demo.ipynb", cells)
    assert gen.generate(tmp_path) == ["exercises/03_demo.ipynb"]
    nb = json.loads((tmp_path / "exercises" / "03_demo.ipynb").read_text())
    source = "".join(nb["cells"][2]["source"])
    assert source == '''# Exercise 3.1: a "quoted" title
class Model:
    def forward(self, x):
        """Keep this docstring."""
        raise NotImplementedError("Exercise 3.1: a \\"quoted\\" title")

    def twice(self, x):
        raise NotImplementedError("Exercise 3.1: a \\"quoted\\" title")
'''
    namespace: dict = {}
    exec(source, namespace)  # valid Python, and the blank says whose it is
    with pytest.raises(NotImplementedError, match='^Exercise 3.1: a "quoted" title$'):
        namespace["Model"]().forward(1)
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in nb["cells"] if c["cell_type"] == "code")
    assert "".join(nb["cells"][0]["source"]) == "# Lesson 03" and "".join(nb["cells"][1]["source"]) == "import math"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_generation_is_deterministic_and_check_lists_stale_files(tmp_path, capsys):
    (tmp_path / "solutions").mkdir()
    write(tmp_path / "solutions" / "03_demo.ipynb", [SOLUTION_CELL])
    assert gen.main(["--root", str(tmp_path), "--check"]) == 1
    assert "stale: exercises/03_demo.ipynb" in capsys.readouterr().out
    assert not (tmp_path / "exercises").exists()  # --check writes nothing
    assert gen.main(["--root", str(tmp_path)]) == 0
    first = (tmp_path / "exercises" / "03_demo.ipynb").read_bytes()
    (tmp_path / "exercises" / "03_demo.ipynb").unlink()
    assert gen.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "exercises" / "03_demo.ipynb").read_bytes() == first  # the same bytes every run
    assert gen.main(["--root", str(tmp_path), "--check"]) == 0
    (tmp_path / "exercises" / "09_gone.ipynb").write_text("{}")
    assert gen.stale(tmp_path) == ["exercises/09_gone.ipynb (no solutions/09_gone.ipynb: delete it)"]


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("# Exercise 3.1: open\n### BEGIN SOLUTION\nx = 1\n", "line 2 has no '### END SOLUTION'"),
        ("# Exercise 3.1: shut\nx = 1\n### END SOLUTION\n", "'### END SOLUTION' without '### BEGIN SOLUTION'"),
        ("def f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION\n", "must start with '# Exercise N.M: title'"),
        ("# Exercise 3.1 no colon\n### BEGIN SOLUTION\n### END SOLUTION\n", "should read '# Exercise N.M: title'"),
        ("# Exercise 3.1: no block\nx = 1\n", "exercise 3.1 has no '### BEGIN SOLUTION'"),
        ("# Exercise 3.1: nested\n### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside the block"),
    ],
)  # fmt: skip
def test_malformed_solution_cells_are_clear_errors(source, error):
    with pytest.raises(gen.SolutionError, match="cell 0: .*" + re.escape(error)):
        gen.blank_notebook(new_notebook(cells=[new_code_cell(source)]), "solutions/03_demo.ipynb")


def test_malformed_notebooks_are_clear_errors(tmp_path, capsys):
    twice = new_notebook(cells=[new_code_cell(SOLUTION_CELL), new_code_cell(SOLUTION_CELL)])
    with pytest.raises(gen.SolutionError, match="cell 1: exercise 3.1 appears twice"):
        gen.blank_notebook(twice, "solutions/03_demo.ipynb")
    with pytest.raises(gen.SolutionError, match="exercise 3.1 belongs to lesson 3, not lesson 4"):
        gen.blank_notebook(new_notebook(cells=[new_code_cell(SOLUTION_CELL)]), "solutions/04_demo.ipynb")
    markdown = new_notebook(cells=[new_markdown_cell("### BEGIN SOLUTION\nanswer\n### END SOLUTION")])
    with pytest.raises(gen.SolutionError, match="belong in code cells"):
        gen.blank_notebook(markdown, "solutions/03_demo.ipynb")
    (tmp_path / "solutions").mkdir()
    write(tmp_path / "solutions" / "03_demo.ipynb", ["# Exercise 3.1: open\n### BEGIN SOLUTION\n"])
    assert gen.main(["--root", str(tmp_path)]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("minivlm.exercises.generate: error: solutions/03_demo.ipynb, cell 0: ")
    assert err.count("\n") == 1


# `python -m minivlm check`, on a notebook of a made-up lesson 99 ------------------------------------------


def check_99_1(answer) -> str:
    if answer(2) != 4:
        fail("square means times itself: did you add instead of multiply?")
    return "squares 2"


@pytest.fixture
def lesson99(monkeypatch):
    module = types.ModuleType("minivlm.exercises.lesson99")
    module.CHECKS = {"99.1": check_99_1, "99.2": check_99_1}
    monkeypatch.setitem(sys.modules, module.__name__, module)


def lesson(tmp_path: Path, answer: str, before: str = "x = 1") -> str:
    """A lesson-99 notebook whose exercise 99.1 is `answer`; returns its path."""
    return str(write(tmp_path / "99_demo.ipynb", [
        ("md", "# Lesson 99"),
        "%matplotlib inline\nimport matplotlib.pyplot as plt\nfrom minivlm.exercises import check\n!echo skipped",
        "%%bash\nexit 1",  # a shell cell: skipped
        before,
        "# Exercise 99.2: done later\ndef cube(x):\n    raise NotImplementedError('Exercise 99.2: done later')",
        'check("99.2", cube)',  # another exercise's check, still blank: passed over
        "plt.plot([1, 2]); plt.show(); print('noise')",
        f"# Exercise 99.1: square\ndef square(x):\n    {answer}",
        'check("99.1", square)',
        "raise RuntimeError('never reached')",
    ]))  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "before", "code", "message"),
    [
        ("return x * x", "x = 1", 0, "Exercise 99.1 passed: squares 2\n"),
        ("return x + x + 1", "x = 1", 1, "Exercise 99.1 failed: square means times itself: did you add instead of "
                                         "multiply?\n"),
        ("raise NotImplementedError('Exercise 99.1: square')", "x = 1", 1, "Exercise 99.1 is not done yet: replace "
                                                                          "the `raise NotImplementedError(...)`"),
        ("return x / 0", "x = 1", 1, "Exercise 99.1 failed: your code raised ZeroDivisionError: division by zero "
                                     "(line 3 of cell 8)\n"),
        ("return x * x", "# a broken cell\n1 / 0", 1, "exercise 99.1's notebook failed before its check, in cell 4 "
                                                      "('# a broken cell'): ZeroDivisionError: division by zero"),
    ],
)  # fmt: skip
def test_check_command(answer, before, code, message, lesson99, tmp_path, capsys):
    assert main(["check", "99.1", "--notebook", lesson(tmp_path, answer, before)]) == code
    out, err = capsys.readouterr()
    assert out.startswith(message) and out.count("\n") == 1 and "noise" not in out and err == ""


def test_check_command_reports_a_blank_it_depends_on(lesson99, tmp_path, capsys):
    path = lesson(tmp_path, "return cube(x)")
    assert main(["check", "99.1", "--notebook", path]) == 1
    out = capsys.readouterr().out
    assert "it uses exercise 99.2's answer, and exercise 99.2 still raises NotImplementedError" in out


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["check", "1.x"], "an exercise id looks like '1.2' (lesson.number), got '1.x'"),
        (["check", "98.1"], "lesson 98 has no exercises"),
        (["check", "99.7"], "lesson 99 has no exercise 99.7; it has 99.1, 99.2"),
        (["check", "99.1", "--notebook", "nowhere.ipynb"], "no notebook nowhere.ipynb"),
        (["check", "99.1"], "no notebook exercises/99_*.ipynb for exercise 99.1 (run `python -m minivlm.exercises"),
    ],
)  # fmt: skip
def test_check_command_bad_ids_are_one_line(argv, error, lesson99, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minivlm: error: {error}") and err.count("\n") == 1


def test_check_command_needs_a_check_cell(lesson99, tmp_path, capsys):
    path = write(tmp_path / "99_demo.ipynb", ["x = 1"])
    assert main(["check", "99.1", "--notebook", str(path)]) == 2
    assert "has no cell that calls check('99.1', ...)" in capsys.readouterr().err


def test_a_blank_is_reported_as_not_done(lesson99):
    from minivlm.exercises import check

    def square(x):
        raise NotImplementedError("Exercise 99.1: square")

    with pytest.raises(ExerciseNotDone, match="^Exercise 99.1 is not done yet"):
        check("99.1", square)
