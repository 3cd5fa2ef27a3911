"""Run an exercise notebook's code from the shell: what `python -m minivlm check 1.1` does.

A notebook is a list of cells; running its code cells in order in one namespace, as a kernel would,
needs no Jupyter at all. `run_exercise` runs the cells of a lesson's exercise notebook up to and
including the one that calls `check("1.1", ...)`, and turns what happened into one line for the
learner: passed, the check's hint, not done yet, or which earlier cell broke. IPython's `%magics`
and `!shell` lines are skipped, and matplotlib draws off screen (the Agg backend) so no window opens.
The cells' own printing is captured, not shown: the command answers one question.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minivlm.exercises import ExerciseFailed, exercise_check
from minivlm.exercises.generate import HEADER, ROOT

__all__ = ["Cell", "CellError", "Outcome", "code_cells", "execute", "find_notebook", "run_exercise"]

CELL_MAGICS_RUN = ("time", "timeit", "capture")  # %%magics whose body is still Python: run the body
CHECK_CALL = re.compile(r"""\bcheck\(\s*["'](\d+\.\d+)["']""")  # check("1.1", ...) in a cell


@dataclass(frozen=True)
class Cell:
    """One code cell, ready to run: its place in the notebook and its source with the magics taken out."""

    number: int  # 1-based position among all the notebook's cells, markdown included
    source: str

    @property
    def title(self) -> str:
        """The first line, which names the cell for the learner ('# Exercise 1.1: ...')."""
        first = next((line.strip() for line in self.source.split("\n") if line.strip()), "")
        return first if len(first) <= 60 else first[:57] + "..."

    @property
    def checks(self) -> set[str]:
        """The exercise ids this cell checks."""
        return set(CHECK_CALL.findall(self.source))

    @property
    def exercise(self) -> str | None:
        """The id of the exercise this cell answers, from its first line, if it is an answer cell."""
        match = HEADER.match(self.source.split("\n", 1)[0].strip())
        return match.group(1) if match else None

    @property
    def filename(self) -> str:
        return f"<cell {self.number}>"


class CellError(Exception):
    """A cell raised: which one, and the original error (also its __cause__)."""

    def __init__(self, cell: Cell, error: BaseException):
        super().__init__(f"cell {cell.number} ({cell.title!r}) raised {type(error).__name__}: {error}")
        self.cell, self.error = cell, error


def _without_magics(source: str) -> str | None:
    """The cell's Python: `%line` magics and `!shell` lines become `pass`; None for a non-Python %%cell magic."""
    lines = source.split("\n")
    if lines and lines[0].lstrip().startswith("%%"):
        magic = lines[0].lstrip()[2:].split(maxsplit=1)
        if not magic or magic[0] not in CELL_MAGICS_RUN:
            return None  # %%bash, %%writefile, ...: not Python
        lines = ["pass", *lines[1:]]  # keep the line numbers
    out = []
    for line in lines:
        stripped = line.lstrip()
        out.append(line[: len(line) - len(stripped)] + "pass" if stripped.startswith(("%", "!")) else line)
    return "\n".join(out)


def code_cells(path: Path) -> list[Cell]:
    """The code cells of a notebook file that a plain Python process can run, in order."""
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = []
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        python = _without_magics("".join(source) if isinstance(source, list) else source)
        if python is not None and python.strip():
            cells.append(Cell(number, python))
    return cells


@contextlib.contextmanager
def _quiet_plots() -> Iterator[None]:
    """matplotlib on the Agg backend (no window opens), its 'cannot show' warning silenced."""
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-interactive.*")
        yield


def new_namespace() -> dict:
    """A fresh namespace, like a new kernel's: `display` works as in Jupyter, as text."""
    namespace: dict = {"__name__": "__main__"}
    try:
        from IPython.display import display
    except ImportError:  # the notebooks extra is not installed
        display = print
    namespace["display"] = display
    return namespace


def execute(cells: list[Cell], namespace: dict) -> None:
    """Run `cells` in `namespace`, in order; the first error is raised as a CellError naming its cell."""
    with _quiet_plots():
        for cell in cells:
            try:
                exec(compile(cell.source, cell.filename, "exec"), namespace)
            except Exception as err:
                raise CellError(cell, err) from err
            finally:
                if "matplotlib.pyplot" in sys.modules:
                    sys.modules["matplotlib.pyplot"].close("all")  # free the figures, as a closed window would


@dataclass(frozen=True)
class Outcome:
    """What running an exercise's check found: status is 'passed', 'failed', 'not done' or 'broken'."""

    exercise: str
    status: str
    message: str  # the one line to show the learner

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def find_notebook(exercise: str, solutions: bool = False, root: Path = ROOT) -> Path:
    """exercises/NN_slug.ipynb (or solutions/...) of the lesson that exercise 'N.M' belongs to."""
    folder = "solutions" if solutions else "exercises"
    lesson = int(exercise.split(".")[0])
    found = sorted((root / folder).glob(f"{lesson:02d}_*.ipynb"))
    if not found:
        hint = "" if solutions else " (run `python -m minivlm.exercises.generate` to write it)"
        raise FileNotFoundError(f"no notebook {folder}/{lesson:02d}_*.ipynb for exercise {exercise}{hint}")
    return found[0]


def _where(error: BaseException) -> str:
    """' (line L of cell N)': the deepest line of notebook code the error passed through, if any."""
    cells = [f for f in traceback.extract_tb(error.__traceback__) if re.fullmatch(r"<cell \d+>", f.filename)]
    return f" (line {cells[-1].lineno} of cell {cells[-1].filename[6:-1]})" if cells else ""


def _outcome(exercise: str, error: BaseException) -> Outcome:
    """Turn an error in the exercise's own answer or check cell into the learner's one line."""
    if isinstance(error, ExerciseFailed):
        return Outcome(exercise, "failed", f"Exercise {exercise} failed: {error}")
    if isinstance(error, NotImplementedError):
        text = str(error)
        if not text.startswith(f"Exercise {exercise} is not done yet"):
            text = f"Exercise {exercise} is not done yet: {text}"
        return Outcome(exercise, "not done", text)
    return Outcome(exercise, "failed", f"Exercise {exercise} failed: your code raised {type(error).__name__}: "
                                       f"{error}{_where(error)}")  # fmt: skip


def run_exercise(exercise: str, *, solutions: bool = False, notebook: str | Path | None = None,
                 root: Path = ROOT) -> Outcome:  # fmt: skip
    """Run a lesson notebook's code cells up to the one that checks `exercise`, and say how it went.

    A ValueError for an id that names no exercise, a FileNotFoundError for a missing notebook. Cells
    that check *other* exercises may fail (the learner is doing this one first): they are passed over.
    """
    exercise_check(exercise)  # a ValueError unless the id names an exercise
    path = Path(notebook) if notebook is not None else find_notebook(exercise, solutions, root)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook {path}")
    cells = code_cells(path)
    last = next((i for i, cell in enumerate(cells) if exercise in cell.checks), None)
    if last is None:
        raise ValueError(f"{path} has no cell that calls check({exercise!r}, ...)")

    namespace, output = new_namespace(), io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        for cell in cells[: last + 1]:
            try:
                execute([cell], namespace)
            except CellError as err:
                ours = cell is cells[last] or cell.exercise == exercise
                if ours:
                    return _outcome(exercise, err.error)
                if cell.checks and isinstance(err.error, (ExerciseFailed, NotImplementedError)):
                    continue  # another exercise's check: not this command's business
                return Outcome(exercise, "broken", f"exercise {exercise}'s notebook failed before its check, in "
                               f"cell {cell.number} ({cell.title!r}): {type(err.error).__name__}: {err.error}"
                               f"{_where(err.error)}")  # fmt: skip
    passed = [line for line in output.getvalue().splitlines() if line.startswith(f"Exercise {exercise} passed")]
    return Outcome(exercise, "passed", passed[-1] if passed else f"Exercise {exercise} passed")
