"""The notebook validation set-up works: nbval in lax mode, current environment, with our sanitizers.

Runs pytest with this repository's own configuration on small notebooks written here: a checked
cell whose stored output differs only in a memory address passes (the sanitizer), an unchecked cell
may differ (lax mode), and a checked cell with a wrong stored output fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parents[1]


def notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """Write a notebook whose code cells carry the given stored stdout."""
    nb = new_notebook(
        cells=[
            new_code_cell(src, execution_count=i, outputs=[new_output("stream", name="stdout", text=out)])
            for i, (src, out) in enumerate(cells, start=1)
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def run_nbval(path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider", str(path)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sanitized_and_lax_notebook_passes_and_a_wrong_output_fails(tmp_path):
    good = notebook(
        tmp_path / "good.ipynb",
        [
            ("# NBVAL_CHECK_OUTPUT\nprint(object())", "<object object at 0x7f00deadbeef>\n"),
            ("import tempfile\nprint(tempfile.mkdtemp())", "/tmp/some-other-dir\n"),  # unchecked: may differ
            ("# NBVAL_CHECK_OUTPUT\nprint(6 * 7)", "42\n"),
        ],
    )
    out = run_nbval(good)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout

    bad = notebook(tmp_path / "bad.ipynb", [("# NBVAL_CHECK_OUTPUT\nprint(6 * 7)", "41\n")])
    out = run_nbval(bad)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed" in out.stdout
