"""Write the exercise notebooks from the solutions: `python -m minivlm.exercises.generate [--check]`.

One source for each lesson's exercises (nbgrader's and Neuromatch's habit): `solutions/NN_slug.ipynb`
holds the answers between `### BEGIN SOLUTION` and `### END SOLUTION`, and this script writes
`exercises/NN_slug.ipynb`, where each such block is replaced by
`raise NotImplementedError("Exercise N.M: title")` at the marker's indentation. The title comes from
the exercise cell's first line, `# Exercise N.M: title`. Outputs and execution counts are cleared;
everything else is kept, so a solution and its exercise differ only in the answers.

Notebooks are read and written as plain JSON in nbformat's layout (indent 1, sorted keys), so the
same solutions always give the same bytes: `--check` compares bytes and lists the stale files, which
is what the test suite runs to catch an exercise notebook nobody regenerated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

__all__ = ["ROOT", "SolutionError", "exercise_header", "blank_source", "blank_notebook", "render_notebook",
           "exercise_ids", "stale", "generate", "main"]  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]  # the repository: solutions/ and exercises/ live here
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HEADER = re.compile(r"^# Exercise (\d+\.\d+): (\S.*?)\s*$")  # an exercise cell's first line
LESSON = re.compile(r"^(\d\d)_\w+\.ipynb$")  # solutions/NN_slug.ipynb
CELL_METADATA_NOISE = ("execution", "collapsed", "scrolled")  # run-time state, not content


class SolutionError(ValueError):
    """A solutions notebook the generator cannot turn into an exercise: the message says where and why."""


def _source(cell: dict) -> str:
    """A cell's source as one string (files store it as a list of lines)."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def exercise_header(source: str, where: str = "cell") -> tuple[str, str] | None:
    """(id, title) from a code cell's first line `# Exercise N.M: title`; None for a cell without one.

    A first line that starts like a header but does not follow the pattern is a SolutionError.
    """
    first = _first_line(source)
    match = HEADER.match(first)
    if match:
        return match.group(1), match.group(2)
    if first.lower().startswith("# exercise"):
        raise SolutionError(f"{where}: its first line {first!r} should read '# Exercise N.M: title'")
    return None


def blank_source(source: str, where: str = "cell") -> str:
    """The exercise version of a solution cell's source: each BEGIN..END block becomes one `raise` line."""
    header = exercise_header(source, where)
    lines = source.split("\n")
    if not any(line.strip() == BEGIN for line in lines):
        if any(line.strip() == END for line in lines):
            raise SolutionError(f"{where}: '{END}' without '{BEGIN}'")
        if header is not None:
            raise SolutionError(f"{where}: exercise {header[0]} has no '{BEGIN}' ... '{END}' block")
        return source
    if header is None:
        raise SolutionError(f"{where}: a cell with '{BEGIN}' must start with '# Exercise N.M: title', "
                            f"got {_first_line(source)!r}")  # fmt: skip
    message = f"Exercise {header[0]}: {header[1]}"
    literal = '"' + message.replace("\\", "\\\\").replace('"', '\\"') + '"'
    out, begin = [], None  # begin: the open block's line number, while inside one
    for number, line in enumerate(lines, start=1):
        marker = line.strip()
        if marker == BEGIN:
            if begin is not None:
                raise SolutionError(f"{where}: '{BEGIN}' on line {number} inside the block opened on line {begin}")
            begin = number
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}raise NotImplementedError({literal})")
        elif marker == END:
            if begin is None:
                raise SolutionError(f"{where}: '{END}' on line {number} without '{BEGIN}'")
            begin = None
        elif begin is None:
            out.append(line)
    if begin is not None:
        raise SolutionError(f"{where}: '{BEGIN}' on line {begin} has no '{END}'")
    return "\n".join(out)


def _lines(text: str) -> list[str]:
    """A source string as nbformat stores it: a list of lines, each but the last ending in a newline."""
    return text.splitlines(keepends=True)


def exercise_ids(notebook: dict, name: str = "notebook") -> list[str]:
    """The exercise ids of a solutions notebook, in order; a SolutionError on a repeated id."""
    ids: list[str] = []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        header = exercise_header(_source(cell), f"{name}, cell {index}")
        if header is None:
            continue
        if header[0] in ids:
            raise SolutionError(f"{name}, cell {index}: exercise {header[0]} appears twice")
        ids.append(header[0])
    return ids


def blank_notebook(notebook: dict, name: str = "notebook") -> dict:
    """The exercise version of a solutions notebook (a new dict; the argument is left unchanged)."""
    notebook = json.loads(json.dumps(notebook))  # a deep copy
    lesson = LESSON.match(Path(name).name)
    for exercise in exercise_ids(notebook, name):
        if lesson and int(exercise.split(".")[0]) != int(lesson.group(1)):
            raise SolutionError(f"{name}: exercise {exercise} belongs to lesson {exercise.split('.')[0]}, "
                                f"not lesson {int(lesson.group(1))}")  # fmt: skip
    for index, cell in enumerate(notebook.get("cells", [])):
        where = f"{name}, cell {index}"
        source = _source(cell)
        if cell.get("cell_type") == "code":
            cell["source"] = _lines(blank_source(source, where))
            cell["outputs"] = []
            cell["execution_count"] = None
        elif BEGIN in source or END in source:
            raise SolutionError(f"{where}: solution markers belong in code cells, found them in a "
                                f"{cell.get('cell_type')} cell")  # fmt: skip
        metadata = cell.get("metadata", {})
        for key in CELL_METADATA_NOISE:
            metadata.pop(key, None)
    return notebook


def render_notebook(notebook: dict) -> str:
    """A notebook as text, in nbformat's own layout, so that Jupyter saving it changes nothing."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def _targets(root: Path) -> dict[Path, str]:
    """{exercises/NN_slug.ipynb: the text it should hold} for every solutions/NN_slug.ipynb."""
    targets = {}
    for solution in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        name = f"solutions/{solution.name}"
        try:
            notebook = json.loads(solution.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SolutionError(f"{name} is not a valid notebook: {err}") from None
        targets[root / "exercises" / solution.name] = render_notebook(blank_notebook(notebook, name))
    return targets


def stale(root: Path = ROOT) -> list[str]:
    """The exercise notebooks that differ from what `generate` would write, missing ones included,
    and exercise notebooks whose solution is gone; paths relative to `root`."""
    targets = _targets(root)
    out = [str(path.relative_to(root)) for path, text in targets.items()
           if not path.is_file() or path.read_text(encoding="utf-8") != text]  # fmt: skip
    orphans = sorted(set((root / "exercises").glob("[0-9][0-9]_*.ipynb")) - set(targets))
    return out + [f"{path.relative_to(root)} (no solutions/{path.name}: delete it)" for path in orphans]


def generate(root: Path = ROOT) -> list[str]:
    """Write every exercise notebook that is stale; return the paths written, relative to `root`."""
    written = []
    for path, text in _targets(root).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
            written.append(str(path.relative_to(root)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minivlm.exercises.generate",
        description="Write exercises/NN_slug.ipynb from solutions/NN_slug.ipynb: every answer between "
        f"'{BEGIN}' and '{END}' becomes `raise NotImplementedError(\"Exercise N.M: title\")`.",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 listing the stale files")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)
    try:
        if args.check:
            out_of_date = stale(args.root)
            for path in out_of_date:
                print(f"stale: {path}")
            if out_of_date:
                print("run `python -m minivlm.exercises.generate` to rewrite them", file=sys.stderr)
                return 1
            print("exercises/ is up to date")
            return 0
        written = generate(args.root)
    except SolutionError as err:
        print(f"minivlm.exercises.generate: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    for path in stale(args.root):  # only orphans can be left
        print(f"warning: {path}", file=sys.stderr)
    if not written:
        print("exercises/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
