"""Training on several processes (DDP) and the GPU configuration, checked on the CPU.

The main test runs `torchrun --nproc_per_node 2 -m minivlm train` with gloo, the backend for CPUs (through
a script that logs every write, then runs the package as -m does), and checks that the two ranks learn
what one process learns from the same global batch, and that only rank 0 prints or writes. The others
check the pieces: main_first across two ranks; in-process, the shards, the loss scaling, the batch
loader, the process group's lifetime, and the "gpu" presets under bfloat16 autocast on the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import minivlm.distributed as D
import minivlm.train as T
from minivlm.__main__ import main, train_config
from minivlm.captioner import CAPTIONER_PRESETS, Captioner
from minivlm.data.captions import IGNORE_INDEX, CaptionCollator, ShapesCaptions
from minivlm.data.shapes import ShapesWorld
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.train import TRAIN_PRESETS, StepBatches, TrainConfig, batch_indices, batch_loader, learned_state, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # of the tiny preset: global batch 16, 8 images a rank

# `python -m minivlm`, with every write to the checkpoint, the LM cache and the loss curve logged with the
# writer's rank: what shows that rank 1 writes nothing (runpy runs the package as -m does).
RECORDER = """
import os, runpy
import minivlm.lm, minivlm.report, minivlm.train

def recorded(module, name):
    write = getattr(module, name)
    def record(*args, **kwargs):
        with open(os.environ["WRITES_LOG"], "a") as log:
            log.write(f"{os.environ['RANK']} {name}\\n")
        return write(*args, **kwargs)
    setattr(module, name, record)

recorded(minivlm.train, "_write_atomically")  # checkpoints
recorded(minivlm.lm, "_save")  # the course LM's cache
recorded(minivlm.report, "save_loss_curve")  # loss.png
runpy.run_module("minivlm", run_name="__main__", alter_sys=True)
"""


# Two ranks through main_first twice: the second time rank 0 fails. Each rank notes what it saw in a folder.
MAIN_FIRST = """
import sys
from pathlib import Path
import torch.distributed as dist
from minivlm import distributed as D

out = Path(sys.argv[1])
with D.process_group():
    with D.main_first():
        (out / f"rank{D.rank()}").write_text(" ".join(sorted(p.name for p in out.iterdir())))  # who was first
    try:
        with D.main_first():
            if D.is_main():
                raise ValueError("no cache for you")
            (out / "rank1 ran").write_text("")
    except Exception as err:
        (out / f"error{D.rank()}").write_text(f"{type(err).__name__}: {err}")
assert not dist.is_initialized()
"""


def run_torchrun(tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (a free port for rank 0), each rank's output in tmp/logs."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--log-dir", str(tmp / "logs"), "--redirects", "3", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_main_first_runs_rank_zero_alone_first_and_shares_its_failure(tmp_path):
    (tmp_path / "main_first.py").write_text(MAIN_FIRST)
    (tmp_path / "seen").mkdir()
    done = run_torchrun(tmp_path, str(tmp_path / "main_first.py"), str(tmp_path / "seen"))
    assert done.returncode == 0, done.stdout + done.stderr
    seen = {p.name: p.read_text() for p in (tmp_path / "seen").iterdir()}
    assert seen["rank0"] == "" and seen["rank1"] == "rank0"  # rank 1 started once rank 0 was done
    assert seen["error0"] == "ValueError: no cache for you"
    assert seen["error1"] == "RuntimeError: rank 0 failed before this rank could start: ValueError: no cache for you"
    assert "rank1 ran" not in seen  # no rank tried the work rank 0 failed at


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory) -> Path:
    """A 2-process run of the tiny preset, from an empty cache: rank 0 must pretrain the course LM first."""
    tmp = tmp_path_factory.mktemp("torchrun")
    (tmp / "recorder.py").write_text(RECORDER)
    done = run_torchrun(tmp, str(tmp / "recorder.py"), "train", "--preset", "tiny", "--steps", str(STEPS),
                        "--out", str(tmp / "run"),
                        env={"MINIVLM_CACHE": str(tmp / "cache"), "WRITES_LOG": str(tmp / "writes.log")})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp


def rank_log(tmp: Path, rank: int, stream: str) -> str:
    (path,) = tmp.glob(f"logs/*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def test_two_ranks_learn_what_one_process_learns(torchrun, monkeypatch):
    """Same global batches, gradients of the same global mean: the same weights, up to float32 rounding.

    Measured on a CPU: 2.5e-7 at most between the two runs' weights (AdamW moves a weight by up to
    lr = 3e-3 a step), and 1.1e-2 when each rank backpropagates its own mean instead (the average of
    shard means is not the global mean). The tolerance, 1e-5, is 40 times the first and a thousandth
    of the second: float32 rounding in another order passes, a wrong loss or batch does not.
    """
    monkeypatch.setenv("MINIVLM_CACHE", str(torchrun / "cache"))  # the LM that rank 0 pretrained
    captioner, history = train(train_config("tiny", STEPS), progress=False)
    ddp_weights = load_file(torchrun / "run" / "trainable.safetensors")
    ours = learned_state(captioner)
    assert ddp_weights.keys() == ours.keys()
    for name, weight in ours.items():
        torch.testing.assert_close(ddp_weights[name], weight, rtol=1e-5, atol=1e-5, msg=name)
    ddp_history = json.loads((torchrun / "run" / "history.json").read_text())
    torch.testing.assert_close(torch.tensor(ddp_history["loss"]), torch.tensor(history["loss"]), rtol=1e-5, atol=0)
    assert ddp_history["lr"] == history["lr"]


def test_only_rank_zero_prints_and_writes(torchrun):
    writes = (torchrun / "writes.log").read_text().split()
    assert writes[0::2] == ["0"] * (len(writes) // 2)  # every write by rank 0 ...
    assert set(writes[1::2]) == {"_save", "_write_atomically", "save_loss_curve"}  # ... the LM cache included
    assert rank_log(torchrun, 1, "stdout") == rank_log(torchrun, 1, "stderr") == ""  # rank 1: not a word
    assert f"trained {STEPS} steps" in rank_log(torchrun, 0, "stdout")
    assert "training the captioner" in rank_log(torchrun, 0, "stderr")  # the progress bar
    assert sorted(p.name for p in (torchrun / "run").iterdir()) == [
        "config.json", "history.json", "loss.png", "optimizer.pt", "trainable.safetensors"]  # fmt: skip
    (lm_entry,) = (torchrun / "cache" / "lm").iterdir()  # one course LM, no half-written copy beside it
    assert lm_entry.name.startswith("tiny-")


# ---- the pieces, in one process ------------------------------------------------------------------


def test_shards_deal_out_the_global_batch():
    """W disjoint shards of B / W whose union is the batch; a batch that does not split is refused."""
    batch = batch_indices(0, 3, 100, 12)
    for world in (1, 2, 4):
        shards = [D.shard(batch, r, world) for r in range(world)]
        assert all(len(s) == 12 // world for s in shards)
        assert sorted(np.concatenate(shards).tolist()) == sorted(batch.tolist())
    sampler = StepBatches(replace(TRAIN_PRESETS["tiny"], steps=5, warmup=0), start=2, rank=1, world=2)
    assert len(sampler) == 3 and next(iter(sampler)) == batch_indices(0, 2, 512, 16)[1::2].tolist()
    with pytest.raises(ValueError, match="split evenly over the 3 processes; choose a multiple of 3"):
        StepBatches(TRAIN_PRESETS["tiny"], world=3)


@pytest.fixture(scope="module")
def lm(tokenizer):
    torch.manual_seed(1234)
    return GPT2(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


def gradient(captioner: Captioner, loss: torch.Tensor) -> torch.Tensor:
    """The gradient of `loss` over the trainable weights, flattened into one vector."""
    grads = torch.autograd.grad(loss, captioner.trainable_parameters(), retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


def test_scaled_shard_losses_average_to_the_global_gradient(lm, tokenizer):
    """What DDP computes, without processes: the average of the ranks' gradients of share_of_mean is the
    gradient of the global batch's mean, also when the shards hold different numbers of tokens."""
    captioner = Captioner.from_config(lm, CAPTIONER_PRESETS["tiny"]).train()
    dataset = ShapesCaptions(ShapesWorld("train", 32, seed=0, length=8))
    collate = CaptionCollator(tokenizer, 32)
    full = collate([dataset[i] for i in range(8)])
    loss = captioner(full["images"], full["input_ids"], full["attention_mask"], full["labels"]).loss
    want = gradient(captioner, loss)
    shards = [collate([dataset[i] for i in D.shard(np.arange(8), r, 2)]) for r in range(2)]
    counts = [(s["labels"] != IGNORE_INDEX).sum() for s in shards]
    assert counts[0] != counts[1]  # unequal shards: where the plain average of means goes wrong
    means = [captioner(s["images"], s["input_ids"], s["attention_mask"], s["labels"]).loss for s in shards]
    total = counts[0] + counts[1]
    shared = sum(gradient(captioner, D.share_of_mean(m, c, total, 2)) for m, c in zip(means, counts)) / 2
    torch.testing.assert_close(shared, want, rtol=1e-5, atol=1e-7)
    naive = sum(gradient(captioner, m) for m in means) / 2
    assert not torch.allclose(naive, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_the_batches_of_batch_indices(tokenizer, workers):
    """The DataLoader path (with worker processes or without) equals collating step s's indices directly."""
    config = replace(TrainConfig(lm="passed in", captioner=CAPTIONER_PRESETS["tiny"]), train_images=40, batch_size=8,
                     steps=7, warmup=0, max_length=32, workers=workers)  # fmt: skip
    dataset = ShapesCaptions(ShapesWorld("train", 32, seed=0, length=40))
    collate = CaptionCollator(tokenizer, 32)
    for rank in (0, 1):
        loader = batch_loader(config, dataset, tokenizer, start=2, rank=rank, world=2)
        got = list(loader)
        assert len(got) == 5  # steps 2 .. 6: a resumed run starts at its step
        for step, batch in zip(range(2, 7), got):
            want = collate([dataset[i] for i in batch_indices(0, step, 40, 8)[rank::2]])
            assert batch["captions"] == want["captions"]
            for key in ("images", "input_ids", "attention_mask", "labels"):
                assert torch.equal(batch[key], want[key]), (step, key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_group_joins_under_torchrun_and_always_leaves(monkeypatch):
    """Without torchrun's variables, nothing; with them, a gloo group for the block, destroyed after an error too."""
    with D.process_group():
        assert not dist.is_initialized() and D.world_size() == 1 and D.is_main()
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    assert D.launched_by_torchrun()
    with pytest.raises(KeyError, match="boom"):
        with D.process_group():
            assert dist.is_initialized() and dist.get_backend() == "gloo" and D.world_size() == 1
            with D.process_group():  # already up: left to its owner
                pass
            assert dist.is_initialized()
            raise KeyError("boom")
    assert not dist.is_initialized()


# ---- the GPU configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("preset, size", [("gpu", 64), ("gpu-224", 224)])
def test_gpu_presets_train_under_bf16_autocast(lm, tokenizer, preset, size):
    """The preset with a tiny LM, a tiny CNN and a few images: its image size, two bf16 steps on the CPU, finite."""
    config = TRAIN_PRESETS[preset]
    assert (config.lm, config.captioner.image_size, config.batch_size) == ("gpt2", size, 128)
    assert config.bf16(torch.device("cuda")) and not config.bf16(torch.device("cpu"))  # "auto"
    assert config.workers > 0  # batches built by other processes, ahead of the GPU
    small = replace(config, lm="passed in", lm_init="random", captioner=replace(config.captioner, cnn_preset="tiny"),
                    train_images=8, batch_size=4, steps=2, warmup=0, max_length=32, sample_every=0, workers=0,
                    precision="bf16")  # fmt: skip
    captioner, history = train(small, lm=lm, tokenizer=tokenizer, progress=False)
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"] + history["grad_norm"]))
    assert captioner.encoder.config.image_size == size
    assert not torch.equal(captioner.lm.transformer.wte.weight, lm.transformer.wte.weight)  # random, not the LM passed


def test_compile_wraps_the_model(lm, tokenizer, monkeypatch):
    compiled = []

    def fake_compile(model):  # the real one takes a minute on a CPU; we check that it is asked for
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    config = TrainConfig(lm="passed in", captioner=CAPTIONER_PRESETS["tiny"], train_images=16, batch_size=4, steps=1,
                         warmup=0, max_length=32, sample_every=0, compile=True)  # fmt: skip
    captioner, _ = train(config, lm=lm, tokenizer=tokenizer, progress=False)
    assert compiled == [captioner]  # one process: the captioner itself, not a DDP wrapper
    assert train_config("tiny", compile=True).compile and not train_config("tiny").compile


def test_gpu_preset_offline_is_one_clear_error(tmp_path, capsys):
    """No network and no cached GPT-2 (the tests run with HF_HUB_OFFLINE=1): one line that says what to do."""
    assert main(["train", "--preset", "gpu", "--steps", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minivlm: error: GPT-2 'gpt2' is not in the local Hugging Face cache") and "offline" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_the_new_fields_retrain_no_cached_captioner(monkeypatch):
    """precision, compile, workers and prefetch came after the cache: at their defaults, the names it had before.

    The names below are those of CAPTIONER_CACHE_VERSION 2 (canonical captions) with the course LMs of 2026-11-24
    (LM CACHE_VERSION 7: "recall" documents, position embeddings that start as sinusoids, and the cpu LM's
    6,000 steps of 8 windows), the CNN preset's shape in the key (when `CNNConfig.stem` came), and the cpu
    preset of 2026-11-25 (a 16-channel stem, 2,800 steps, 3 length groups): each renamed entries on purpose.
    So did the cpu preset's prefix read by every block and its 179,200 training images, later that day; the
    preset before them, whose `prefix_depth` is CaptionerConfig's default, keeps the name it had. And so did
    its CNN's colour path (`CNNConfig.colour`, 2026-12-06); the CNN presets without one keep their names. And
    its grid mapper (2026-12-07, `GridMapper`, P = 16), in place of the MLP's 4 vectors; and the word view of
    the cpu preset (`CaptionerConfig.word_view`, later that day), and its colour swap (`TrainConfig.colour_swap`,
    2026-12-08). The LM's key is part of every name: with the
    LM of binding by colour (LM CACHE_VERSION 8, 2026-12-07), every entry was renamed, and with CACHE_VERSION 7
    every name below is the one it had.
    """
    from minivlm import cnn
    from minivlm import lm as L

    assert T.CAPTIONER_CACHE_VERSION == 2 and L.CACHE_VERSION == 8
    assert T._cache_name("tiny") == "tiny-eb073579ddad" and T._cache_name("cpu") == "cpu-c6a247ee394b"
    no_swap = replace(T.TRAIN_PRESETS["cpu"], colour_swap=0.0)
    monkeypatch.setitem(T.TRAIN_PRESETS, "cpu", no_swap)
    assert T._cache_name("cpu") == "cpu-79450a80b490"  # the preset before its colour swap (2026-12-08)
    monkeypatch.setattr(L, "CACHE_VERSION", 7)  # the LMs of 2026-11-24 to 2026-12-07
    assert T._cache_name("tiny") == "tiny-801a54c4e1c5" and T._cache_name("cpu") == "cpu-2a1fd712bb73"
    now = no_swap
    grid = replace(now, captioner=replace(now.captioner, word_view=0))
    monkeypatch.setitem(T.TRAIN_PRESETS, "cpu", grid)
    assert T._cache_name("cpu") == "cpu-5f86c07f9cce"  # the grid preset before its word view (2026-12-07)
    monkeypatch.setitem(T.TRAIN_PRESETS, "cpu", replace(grid, captioner=replace(grid.captioner, mapper="mlp",
                                                                                 prefix_length=4)))  # fmt: skip
    assert T._cache_name("cpu") == "cpu-5fcbd8932bd2"  # the preset of 2026-12-06, before the grid mapper
    monkeypatch.setitem(cnn.CNN_PRESETS, "cpu", replace(cnn.CNN_PRESETS["cpu"], colour=0))
    assert T._cache_name("cpu") == "cpu-efa93c940f87"  # CNNConfig's new field, at its default: the old name
    before = replace(T.TRAIN_PRESETS["cpu"], captioner=CAPTIONER_PRESETS["cpu"], train_images=20_000)
    assert before.captioner.prefix_depth == 1
    monkeypatch.setitem(T.TRAIN_PRESETS, "cpu", before)
    assert T._cache_name("cpu") == "cpu-077f57243990"  # CaptionerConfig's new field, at its default: the old name
    monkeypatch.setitem(T.TRAIN_PRESETS, "cpu", replace(before, precision="bf16"))
    assert T._cache_name("cpu") != "cpu-077f57243990"  # a change that changes the weights: another entry


def test_the_cnn_presets_shape_is_part_of_the_cache_name(monkeypatch):
    """The config names its CNN preset only; a preset whose layers change must not load the old weights."""
    from minivlm import cnn

    before = T._cache_name("cpu")
    cpu = cnn.CNN_PRESETS["cpu"]
    monkeypatch.setitem(cnn.CNN_PRESETS, "cpu", replace(cpu, stem=0 if cpu.stem else 8))
    assert T._cache_name("cpu") != before
    other_pool = "max" if cpu.colour_pool == "mean" else "mean"  # a field younger than the cache counts when changed
    monkeypatch.setitem(cnn.CNN_PRESETS, "cpu", replace(cpu, colour_pool=other_pool))
    assert T._cache_name("cpu") != before
    monkeypatch.setitem(cnn.CNN_PRESETS, "cpu", cpu)
    assert T._cache_name("cpu") == before
    monkeypatch.setitem(T.TRAIN_PRESETS, "cpu", replace(T.TRAIN_PRESETS["cpu"], colour_swap=0.1))  # and TrainConfig's
    assert T._cache_name("cpu") != before


def test_a_checkpoint_older_than_the_new_fields_resumes(lm, tokenizer, tmp_path):
    """Its config.json lacks them: they read as their defaults; and how fast a run goes may change on resume."""
    config = TrainConfig(lm="passed in", captioner=CAPTIONER_PRESETS["tiny"], train_images=16, batch_size=4, steps=2,
                         warmup=0, max_length=32, sample_every=0)  # fmt: skip
    train(replace(config, steps=1), lm=lm, tokenizer=tokenizer, out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    for name in T.ADDED_FIELDS:
        del saved["train"][name]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="other steps"):  # still checked: what it learns
        train(config, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, resume=True, progress=False)
    steps = []
    train(replace(config, steps=1, workers=1), lm=lm, tokenizer=tokenizer, out_dir=tmp_path, resume=True,
          progress=False, callback=lambda step, *_: steps.append(step))  # fmt: skip
    assert steps == []  # step 1 of 1 was done: nothing left, and no complaint about workers
