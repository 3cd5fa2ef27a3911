"""The command line: `python -m minivlm ...` and `run.py`, run as a learner runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands():
    out = run("-m", "minivlm", "--help")
    assert out.returncode == 0
    assert "verify" in out.stdout and "demo" in out.stdout


def test_demo_runs_the_smoke_run_and_passes():
    """The README's first command ends in `python -m minivlm demo`; this is that job."""
    out = run("-m", "minivlm", "demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("[ok]") == 3 and "FAIL" not in out.stdout
    assert "All checks passed." in out.stdout


def test_verify_tiny_preset():
    out = run("-m", "minivlm", "verify", "--preset", "tiny", "--new-tokens", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All checks passed." in out.stdout


def test_bad_arguments_get_one_clear_line():
    out = run("-m", "minivlm", "verify", "--preset", "gpt5")
    assert out.returncode == 2
    assert "invalid choice: 'gpt5'" in out.stderr and "Traceback" not in out.stderr
    out = run("-m", "minivlm", "verify", "--new-tokens", "0")
    assert out.returncode == 2 and "--new-tokens must be at least 1" in out.stderr


def test_run_py_explains_itself_and_rejects_unknown_commands():
    out = run("run.py", "--help")
    assert out.returncode == 0 and "python3 run.py demo" in out.stdout
    assert run("run.py", "deploy").returncode == 2


def test_pretrain_lm_caches_then_loads(tmp_path):
    env = {**os.environ, "MINIVLM_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-m", "minivlm", "pretrain-lm", "--preset", "tiny"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert "cached in" in first.stdout and "2-way name binding" in first.stdout
    assert list((tmp_path / "lm").iterdir())[0].name.startswith("tiny-")
    again = subprocess.run([sys.executable, "-m", "minivlm", "pretrain-lm", "--preset", "tiny"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert again.returncode == 0 and "pretraining" not in again.stderr  # no progress bar: loaded, not trained
