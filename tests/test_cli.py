"""The command line: `python -m minivlm ...` and `run.py`, run as a learner runs them.

The captioner's commands run in-process through `main([...])`, on the tiny presets with the course LM
cached in a temporary folder: the same code as the command, without a second of start-up per call.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minivlm import train as T
from minivlm.__main__ import main
from minivlm.data.shapes import ShapesWorld

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("verify", "pretrain-lm", "train", "evaluate", "caption", "demo", "check")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands():
    out = run("-m", "minivlm", "--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


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
    assert "cached in" in first.stdout and "2-way name binding" in first.stdout and "a list of words" in first.stdout
    assert list((tmp_path / "lm").iterdir())[0].name.startswith("tiny-")
    again = subprocess.run([sys.executable, "-m", "minivlm", "pretrain-lm", "--preset", "tiny"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert again.returncode == 0 and "pretraining" not in again.stderr  # no progress bar: loaded, not trained


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The course LM's cache in a temporary folder: the tiny LM is pretrained there (about a second)."""
    monkeypatch.setenv("MINIVLM_CACHE", str(tmp_path / "cache"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("minivlm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m minivlm {command}") and len(out.split("\n\n")[1]) > 40  # a description


def test_demo_writes_the_report(tmp_path, cache, capsys, monkeypatch):
    """`python3 run.py demo` runs `demo` with the cpu preset; this is the same job on the tiny one."""
    out = tmp_path / "report"
    assert main(["demo", "--preset", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| metric | test | heldout |" in printed and f"report: {out}/metrics.md" in printed
    assert "wall time" in printed
    assert "| exact match |" in (out / "metrics.md").read_text()
    assert "| colours and shapes paired wrongly |" in (out / "metrics.md").read_text() and "How the wrong captions are wrong" in printed
    for name in ("samples.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    assert (out / "checkpoint" / "config.json").is_file()  # `caption --checkpoint` can reuse it
    # the lessons' course_captioner("tiny") now loads the demo's captioner instead of training it again
    assert "also cached in" in printed
    with monkeypatch.context() as patch:
        patch.setattr(T, "train", lambda *a, **k: pytest.fail("course_captioner trained what the demo cached"))
        _, _, info = T.course_captioner("tiny", progress=False)
    cached, trained = (load_file(Path(d) / "trainable.safetensors") for d in (info["path"], out / "checkpoint"))
    assert cached.keys() == trained.keys() and all(torch.equal(v, trained[k]) for k, v in cached.items())
    assert main(["demo", "--preset", "tiny", "--steps", "2", "--images", "4", "--out", str(out)]) == 0  # again
    assert "also cached in" not in capsys.readouterr().out  # 2 steps are not the preset: the cache keeps the first
    assert all(torch.equal(v, w) for v, w in zip(cached.values(),
                                                 load_file(Path(info["path"]) / "trainable.safetensors").values()))


def test_caption_of_a_missing_or_unreadable_file_is_one_line(tmp_path, capsys):
    assert main(["caption", "--checkpoint", str(tmp_path), str(tmp_path / "nope.png")]) == 2
    assert "nope.png not found" in one_error_line(capsys)
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["caption", "--checkpoint", str(tmp_path), str(tmp_path / "notes.png")]) == 2
    assert "cannot read image file" in one_error_line(capsys)


def test_train_evaluate_caption_round_trip(tmp_path, cache, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--preset", "tiny", "--steps", "4", "--mapper", "mlp", "--prefix-length", "3",
                 "--prefix-depth", "2", "--word-alignment", "0.5", "--word-view", "3", "--seed", "7",
                 "--out", run]) == 0  # fmt: skip
    assert "trained 4 steps" in capsys.readouterr().out and (tmp_path / "run" / "loss.png").is_file()
    config = T.read_config(run)
    c = config.captioner
    assert (config.steps, c.mapper, c.prefix_length, c.prefix_depth, config.word_alignment) == (4, "mlp", 3, 2, 0.5)
    assert c.word_view == 3 and T.load_captioner(run).word_view == 3 and config.seed == 7
    deeper = ["train", "--preset", "tiny", "--steps", "4", "--prefix-depth", "3", "--out", str(tmp_path / "deep")]
    assert main(deeper) == 2  # the tiny course LM has 2 blocks
    assert "read by 1 to 2 blocks of this LM, got depth=3" in one_error_line(capsys)
    assert not (tmp_path / "deep").exists()  # nothing half-written
    swapped = ["train", "--preset", "tiny", "--steps", "4", "--colour-swap", "0.3", "--out", str(tmp_path / "swap")]
    assert main(swapped) == 2  # the tiny course LM's BPE spells colours in several tokens, which cannot be swapped
    assert "'red' is 2 tokens of this tokenizer, not one" in one_error_line(capsys)
    assert not (tmp_path / "swap").exists()
    assert main(["train", "--preset", "tiny", "--steps", "4", "--out", run]) == 2  # not overwritten without --resume
    assert "already holds a checkpoint: add --resume" in one_error_line(capsys)

    assert main(["evaluate", "--checkpoint", run, "--images", "4", "--strategy", "beam", "--beams", "2"]) == 0
    out = capsys.readouterr().out
    assert "| metric | test | heldout |" in out and "| CIDEr |" in out
    assert "| colours and shapes paired wrongly |" in out  # the second table: kinds of error

    world = ShapesWorld("test", image_size=64, seed=5, length=2)  # twice the captioner's size: resized
    paths = [tmp_path / "scene.png", tmp_path / "scene with alpha.png"]
    Image.fromarray(world.image(0)).save(paths[0])
    Image.fromarray(np.dstack([world.image(1), np.full((64, 64), 255, np.uint8)])).save(paths[1])  # RGBA
    assert main(["caption", "--checkpoint", run, *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.partition(": ")[0] for line in lines] == list(map(str, paths))


def test_bad_options_and_checkpoints_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--preset", "tiny", "--steps", "0"])
    assert done.value.code == 2 and "must be a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["train", "--preset", "tiny", "--word-alignment", "-1"])
    assert done.value.code == 2 and "must be a number of at least 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["train", "--preset", "tiny", "--seed", "-1"])
    assert done.value.code == 2 and "must be an integer of at least 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["train", "--preset", "tiny", "--colour-swap", "1.5"])
    assert done.value.code == 2 and "must be a probability in [0, 1], got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["train", "--preset", "tiny", "--word-view", "five"])
    assert done.value.code == 2 and "must be an integer of at least 0, got 'five'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "holds no complete checkpoint" in one_error_line(capsys)
    assert main(["train", "--preset", "tiny", "--lm", "no-such-lm", "--out", str(tmp_path / "run")]) == 2
    assert "unknown language model 'no-such-lm'" in one_error_line(capsys)
