"""The benchmark scripts run end to end (on tiny sizes) and write their numbers; they time nothing themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_run(script: str, tmp_path: Path) -> tuple[str, dict]:
    """Run `bench/<script> --quick --json`; return what it printed and the numbers it wrote."""
    out = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--json", str(tmp_path / "bench.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, json.loads((tmp_path / "bench.json").read_text())


def test_core_benchmark_quick_run_prints_every_ratio(tmp_path):
    stdout, results = quick_run("core.py", tmp_path)
    for heading in ("1. Attention", "2. GPT-2 forward", "3. Greedy generation"):
        assert heading in stdout
    assert results["attention"]["ours_over_torch"] > 0 and results["attention"]["max_abs_diff"] < 1e-5
    assert results["gpt2_forward"]["sdpa"]["max_abs_logit_diff"] < 1e-4
    assert all(row["identical_tokens"] for row in results["generation"])


def test_lm_benchmark_quick_run_prints_every_number(tmp_path):
    stdout, results = quick_run("lm.py", tmp_path)
    for line in ("pretraining time", "held-out perplexity", "copy, test captions", "copy, per attribute", "word similarity",
                 "2-way, with task induction"):
        assert line in stdout
    assert results["preset"] == "tiny" and results["heldout_perplexity"] > 1
    ways = {(row["ways"], row["task_induction"]) for row in results["binding"]}
    assert ways == {(2, True), (2, False), (5, True), (5, False)}
