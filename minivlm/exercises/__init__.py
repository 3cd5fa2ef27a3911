"""Self-checks for the course's exercises: `check("1.1", answer)` right after the learner's answer.

Each lesson NN has a module `minivlm.exercises.lessonNN` with a dict `CHECKS` from exercise id
("1.1") to a function that tests the learner's answer against the package's own implementation on
seeded inputs. A check returns a line saying what it verified, or calls `fail(hint)` with a specific
hint about the likely mistake. A blank answer (one that still raises `NotImplementedError`) is reported
as `ExerciseNotDone`, itself a `NotImplementedError`: an exercise notebook run top to bottom stops at
its first blank. The exercises follow Neuromatch's and nbgrader's habit: one source (the solutions),
from which `python -m minivlm.exercises.generate` writes the blanks.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import NoReturn

__all__ = ["ExerciseFailed", "ExerciseNotDone", "Passed", "check", "exercise_check", "fail", "lesson_checks"]

EXERCISE_ID = re.compile(r"^(\d+)\.(\d+)$")
BLANK = re.compile(r"^Exercise (\d+\.\d+)\b")  # the message of an exercise's blank, NotImplementedError


class ExerciseFailed(AssertionError):
    """The answer runs but is wrong; the message is a hint about the likely mistake."""


class ExerciseNotDone(NotImplementedError):
    """The answer is still the blank that raises NotImplementedError."""


class Passed(str):
    """The line `check` printed, returned as a str; a notebook does not echo it a second time as Out[]."""

    def _ipython_display_(self) -> None:
        pass


def fail(hint: str) -> NoReturn:
    """Stop a check with a hint for the learner."""
    raise ExerciseFailed(hint)


def lesson_checks(lesson: int) -> dict[str, Callable[..., str]]:
    """The CHECKS of lesson `lesson`'s module, `minivlm.exercises.lessonNN`."""
    name = f"minivlm.exercises.lesson{lesson:02d}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise  # the lesson's module exists but imports something missing: a bug to see in full
        raise ValueError(f"lesson {lesson} has no exercises (no module {name})") from err
    return module.CHECKS


def exercise_check(exercise: str) -> Callable[..., str]:
    """The check function of exercise "N.M"; a ValueError saying why for an id that names no exercise."""
    match = EXERCISE_ID.match(exercise)
    if match is None:
        raise ValueError(f"an exercise id looks like '1.2' (lesson.number), got {exercise!r}")
    checks = lesson_checks(int(match.group(1)))
    if exercise not in checks:
        raise ValueError(f"lesson {match.group(1)} has no exercise {exercise}; it has {', '.join(sorted(checks))}")
    return checks[exercise]


def check(exercise: str, *answers) -> str:
    """Check the learner's answer(s) to `exercise` ("N.M"); print and return what passed, else raise a hint."""
    checker = exercise_check(exercise)
    try:
        verified = checker(*answers)
    except NotImplementedError as err:
        blank = BLANK.match(str(err))  # the generator's blanks say whose they are: "Exercise 1.1: title"
        if blank and blank.group(1) != exercise:
            raise ExerciseNotDone(
                f"Exercise {exercise} is not done yet: it uses exercise {blank.group(1)}'s answer, and exercise "
                f"{blank.group(1)} still raises NotImplementedError: do it first."
            ) from err
        raise ExerciseNotDone(
            f"Exercise {exercise} is not done yet: replace the `raise NotImplementedError(...)` line with your answer."
        ) from err
    message = Passed(f"Exercise {exercise} passed: {verified}")
    print(message)
    return message
