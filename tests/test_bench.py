"""The benchmark scripts run end to end (on tiny sizes) and write their numbers; they time nothing themselves."""

from __future__ import annotations

import importlib.util
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


def test_captioner_benchmark_quick_run_prints_the_controls(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/captioner.py", "--quick", "--table", "controls", "--json", str(tmp_path / "bench.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "bench.json").read_text())["controls"]
    assert [r["label"] for r in results] == ["frozen pretrained LM (the course)", "frozen random LM (control)",
                                            "fine-tuned LM (control)"]  # fmt: skip
    for r in results:
        assert r["label"] in out.stdout
        assert r["images_per_second"] > 0 and r["peak_memory_mb"] > 0
        assert set(r["metrics"]) == {"test", "heldout"}
    frozen, random_lm, tuned = results
    assert tuned["trained_parameters"] > frozen["trained_parameters"] == random_lm["trained_parameters"]
    assert random_lm["final_loss"] > frozen["final_loss"]  # a random LM gives the prefix nothing to steer


def test_captioner_ablation_covers_every_prefix_length_and_mapper():
    spec = importlib.util.spec_from_file_location("bench_captioner", ROOT / "bench" / "captioner.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    changes = [c for _, c in bench.rows("ablation")]
    assert {(c["prefix_length"], c["mapper"]) for c in changes} == {(p, m) for p in (1, 2, 4, 8)
                                                                   for m in ("linear", "mlp", "transformer")}
