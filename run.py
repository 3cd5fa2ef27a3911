#!/usr/bin/env python3
"""The two commands of minivlm, for a fresh clone with nothing but Python (3.11+) and pip.

    python3 run.py demo    # set up .venv if needed, then run the main job (the end-to-end demo)
    python3 run.py test    # set up .venv if needed, then run every test and notebook

Setting up means: create a virtual environment in `.venv/` if it is missing, and install minivlm
into it (editable, with the notebook and test extras) whenever `pyproject.toml` has changed since
the last install. Extra arguments after `test` go to pytest, e.g. `python3 run.py test -k attention`.
`python3 run.py setup` only sets up. The script uses the standard library alone, on purpose.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".minivlm-install-stamp"  # hash of pyproject.toml at the last successful install
EXTRAS = "notebooks,test"
MIN_PYTHON = (3, 11)


def venv_python() -> Path:
    """The interpreter inside `.venv` (bin/ on Linux and macOS, Scripts/ on Windows)."""
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def wanted_stamp() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def run(cmd: list[str | Path]) -> None:
    """Run a command in the repository root; stop with its exit code if it fails."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    code = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if code != 0:
        sys.exit(code)


def setup() -> Path:
    """Create `.venv` if missing and (re)install minivlm when pyproject.toml changed."""
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"minivlm needs Python {'.'.join(map(str, MIN_PYTHON))} or newer; "
                 f"this is {sys.version.split()[0]}. Run this script with a newer python3.")
    python = venv_python()
    if not python.exists():
        print(f"Creating a virtual environment in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=VENV.exists()).create(VENV)
    if STAMP.exists() and STAMP.read_text().strip() == wanted_stamp():
        return python
    print("Installing minivlm and its dependencies into .venv "
          "(the first time downloads PyTorch, a few GB; later runs skip this) ...", flush=True)
    run([python, "-m", "pip", "install", "--upgrade", "pip"])
    run([python, "-m", "pip", "install", "-e", f".[{EXTRAS}]"])
    STAMP.write_text(wanted_stamp() + "\n")
    return python


def main(argv: list[str]) -> int:
    commands = {"setup", "demo", "test"}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    python = setup()
    if command == "setup":
        return 0
    if command == "demo":
        cmd = [python, "-m", "minivlm", "demo", *rest]
    else:
        # pytest's own exit codes go through unchanged: 5 ("no tests collected") fails, as it should.
        cmd = [python, "-m", "pytest", *rest]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
