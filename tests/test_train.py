"""Training the captioner: resuming is exact, the LM stays bit-identical (and changes in the fine-tuning control),
checkpoints hold only learned weights and survive a failed save, and a trained captioner reloads to the same outputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.testing import assert_close

import minivlm.train as T
from minivlm.captioner import CAPTIONER_PRESETS
from minivlm.data.captions import CaptionCollator, ShapesCaptions
from minivlm.data.shapes import ShapesWorld
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.prefix import word_alignment_loss
from minivlm.report import save_loss_curve
from minivlm.train import TrainConfig, batch_indices, learned_state, load_captioner, read_config, train

# A tiny CNN, linear mapper and P = 2; 64 images in batches of 8; checkpoints every 2 steps.
CONFIG = TrainConfig(lm="passed in", captioner=CAPTIONER_PRESETS["tiny"], train_images=64, batch_size=8, steps=4,
                     lr=1e-2, warmup=1, max_length=32, sample_every=0, checkpoint_every=2, threads=1)  # fmt: skip


def tiny_lm(vocab_size: int) -> GPT2:
    """A tiny GPT-2 standing in for a pretrained LM; seed 1234, so config.seed's random LM differs from it."""
    torch.manual_seed(1234)
    return GPT2(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm(len(tokenizer))


@pytest.fixture(scope="module")
def run(lm, tokenizer, tmp_path_factory):
    """(captioner, history, out_dir) of one 4-step run, shared by the tests that only read it."""
    out_dir = tmp_path_factory.mktemp("run")
    captioner, history = train(CONFIG, lm=lm, tokenizer=tokenizer, out_dir=out_dir, progress=False)
    return captioner, history, out_dir


def lm_state(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def outputs(captioner, seed: int = 0) -> torch.Tensor:
    """Logits for random images and tokens: what two captioners with the same weights agree on exactly."""
    g = torch.Generator().manual_seed(seed)
    images, ids = torch.rand(3, 3, 32, 32, generator=g), torch.randint(2, 300, (3, 5), generator=g)
    with torch.no_grad():
        return captioner(images, ids).logits


def test_batches_are_a_pure_function_of_seed_and_step():
    """An epoch is a permutation (no image twice, N mod B left out); one (seed, step), one batch, always."""
    epoch = np.concatenate([batch_indices(0, s, 10, 3) for s in range(3)])  # 3 steps of 3 out of 10 images
    assert len(set(epoch.tolist())) == 9
    assert np.array_equal(batch_indices(0, 4, 10, 3), batch_indices(0, 4, 10, 3))
    assert not np.array_equal(batch_indices(0, 3, 10, 3), batch_indices(0, 0, 10, 3))  # a new epoch, a new order
    assert not np.array_equal(batch_indices(1, 0, 10, 3), batch_indices(0, 0, 10, 3))


def test_resuming_after_a_crash_is_exact(lm, tokenizer, run, tmp_path):
    """Crash after step 3 (last checkpoint: step 2), resume: the same weights and losses as the unbroken run."""
    unbroken, history, _ = run

    def crash(step, captioner, history):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(CONFIG, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, progress=False, callback=crash)
    seen = []
    resumed, resumed_history = train(CONFIG, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, resume=True,
                                     progress=False, callback=lambda step, *_: seen.append(step))  # fmt: skip
    assert seen == [3, 4]  # continued from the checkpoint at step 2
    assert resumed_history == history
    want, got = learned_state(unbroken), learned_state(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_checkpoint_holds_only_learned_weights_and_reloads(lm, run):
    captioner, history, out_dir = run
    weights = load_file(out_dir / "trainable.safetensors")
    trainable = {name for name, p in captioner.named_parameters() if p.requires_grad}
    assert not any(name.startswith("lm.") for name in weights)  # the frozen LM is rebuilt, never saved
    assert set(weights) == trainable | {"mapper.target_scale"}  # and the mapper's buffer
    assert read_config(out_dir) == CONFIG  # config.json round-trips
    assert json.loads((out_dir / "history.json").read_text()) == {"step": 4, **history}
    assert len(history["loss"]) == len(history["lr"]) == CONFIG.steps
    loaded = load_captioner(out_dir, lm=lm)
    assert torch.equal(outputs(loaded), outputs(captioner))


def test_loading_says_what_is_wrong(lm, run, tmp_path):
    _, _, out_dir = run
    with pytest.raises(FileNotFoundError, match="config.json, trainable.safetensors missing"):
        load_captioner(tmp_path)
    with pytest.raises(ValueError, match="pass the same LM"):
        load_captioner(out_dir)  # trained with an LM passed in: there is no spec to load it from
    wider = GPT2(replace(lm.config, n_embd=64))
    with pytest.raises(ValueError, match="width D=32"):
        load_captioner(out_dir, lm=wider)


def test_existing_checkpoint_is_not_overwritten_nor_resumed_with_another_config(lm, tokenizer, run):
    _, _, out_dir = run
    with pytest.raises(FileExistsError, match="resume=True"):
        train(CONFIG, lm=lm, tokenizer=tokenizer, out_dir=out_dir, progress=False)
    with pytest.raises(ValueError, match="other lr"):
        train(replace(CONFIG, lr=0.5), lm=lm, tokenizer=tokenizer, out_dir=out_dir, resume=True, progress=False)


def test_lm_is_bit_identical_after_training_and_changes_in_the_control(lm, tokenizer, run):
    """THE property of Frozen: the LM does not move. With train_lm=True (the control) it does, in a copy."""
    captioner, _, _ = run
    original = lm_state(tiny_lm(lm.config.vocab_size))  # the LM's weights before any training, built again
    trained = lm_state(captioner.lm)
    assert trained.keys() == original.keys() and all(torch.equal(original[k], t) for k, t in trained.items())
    control = replace(CONFIG, captioner=replace(CONFIG.captioner, train_lm=True), steps=2, checkpoint_every=2)
    tuned, _ = train(control, lm=lm, tokenizer=tokenizer, progress=False)
    assert not torch.equal(tuned.lm.transformer.wte.weight, lm.transformer.wte.weight)
    assert all(torch.equal(original[k], t) for k, t in lm_state(lm).items())  # the caller's LM: untouched
    assert any(name.startswith("lm.") for name in learned_state(tuned))  # the control saves its LM weights


def test_length_groups_train_as_one_padded_batch(lm, tokenizer, run):
    """A speed option only: the same run with the captions grouped by length has the same losses and weights."""
    captioner, history, _ = run
    grouped, grouped_history = train(replace(CONFIG, length_groups=3), lm=lm, tokenizer=tokenizer, progress=False)
    assert_close(torch.tensor(grouped_history["loss"]), torch.tensor(history["loss"]), atol=1e-5, rtol=1e-5)
    assert_close(outputs(grouped), outputs(captioner), atol=1e-4, rtol=1e-4)


def test_a_deep_prefix_trains_saves_and_reloads(lm, tokenizer, tmp_path):
    """prefix_depth=2: the LM stays bit-identical, and the checkpoint (K sets of P lengths) reloads to the same outputs."""
    before = lm_state(lm)
    config = replace(CONFIG, captioner=replace(CONFIG.captioner, prefix_depth=2), word_alignment=0.5)
    captioner, history = train(config, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, progress=False)
    assert captioner.prefix_depth == 2 and captioner.prefix_length == CONFIG.captioner.prefix_length
    assert history["loss"][-1] < history["loss"][0] and len(history["word_loss"]) == config.steps
    assert load_file(tmp_path / "trainable.safetensors")["mapper.target_scale"].shape == (2 * 2, 1)
    assert read_config(tmp_path) == config
    assert torch.equal(outputs(load_captioner(tmp_path, lm=lm)), outputs(captioner))
    assert all(torch.equal(before[k], t) for k, t in lm_state(lm).items())


def test_word_alignment_writes_the_prefix_in_words_and_leaves_the_lm_frozen(lm, tokenizer):
    """With word_alignment the prefix is pulled towards the caption's words; the LM still does not move."""
    before = lm_state(lm)
    config = replace(CONFIG, word_alignment=1.0, steps=30, warmup=2, lr=3e-3)
    captioner, history = train(config, lm=lm, tokenizer=tokenizer, progress=False)
    assert len(history["word_loss"]) == len(history["loss"]) == 30
    assert np.mean(history["word_loss"][-5:]) < 0.5 * np.mean(history["word_loss"][:5])
    assert all(torch.equal(before[k], t) for k, t in lm_state(captioner.lm).items())
    assert "word_loss" not in train(replace(config, word_alignment=0.0, steps=1, warmup=0), lm=lm,
                                    tokenizer=tokenizer, progress=False)[1]  # fmt: skip
    # the run's own words: its prefix is nearer the captions' last tokens than an untrained one's
    data = ShapesCaptions(ShapesWorld("train", 32, 0, 16))
    batch = CaptionCollator(tokenizer, config.max_length)([data[i] for i in range(16)])
    fresh = T._build_captioner(config, lm).eval()  # the same init, untrained
    with torch.no_grad():
        losses = [word_alignment_loss(c.prefix(batch["images"]), lm.get_input_embeddings().weight, batch["labels"])
                  for c in (captioner, fresh)]  # fmt: skip
    assert losses[0] < losses[1]


def test_a_word_view_learns_its_words_and_leaves_the_rest_of_the_run_as_it_was(lm, tokenizer, tmp_path):
    """The same run with and without a word view: equal caption losses, gradient norms and weights, bit for bit;
    the word view's own loss falls; it is saved, loaded and resumed with the rest; the LM does not move."""
    before = lm_state(lm)
    config = replace(CONFIG, steps=30, warmup=2, lr=3e-3, sample_every=0)
    viewed = replace(config, captioner=replace(config.captioner, word_view=3))
    plain, history = train(config, lm=lm, tokenizer=tokenizer, progress=False)
    model, with_view = train(viewed, lm=lm, tokenizer=tokenizer, progress=False)
    assert "word_view_loss" not in history and len(with_view["word_view_loss"]) == 30
    assert with_view["loss"] == history["loss"] and with_view["grad_norm"] == history["grad_norm"]
    ours = model.state_dict()
    assert all(torch.equal(t, ours[k]) for k, t in plain.state_dict().items())
    assert np.mean(with_view["word_view_loss"][-5:]) < 0.5 * np.mean(with_view["word_view_loss"][:5])
    assert all(torch.equal(before[k], t) for k, t in lm_state(model.lm).items())
    # cut off after step 17 (last checkpoint: 15) and resumed, it is the whole run; loaded, it writes the same words

    def crash(step, *_):
        if step == 17:
            raise KeyboardInterrupt

    halves = replace(viewed, checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        train(halves, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, progress=False, callback=crash)
    resumed, history = train(halves, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, resume=True, progress=False)
    assert history == with_view
    want, got = learned_state(model), learned_state(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_captioner(tmp_path, lm=lm).words(images), model.words(images))


def test_random_lm_control_is_frozen_and_rebuilt_on_load(lm, tokenizer, tmp_path):
    config = replace(CONFIG, lm_init="random", steps=1, warmup=0)
    captioner, _ = train(config, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, progress=False)
    random_lm = captioner.lm
    assert random_lm is not lm and random_lm.config == lm.config  # the same architecture ...
    assert not torch.equal(random_lm.transformer.wte.weight, lm.transformer.wte.weight)  # ... other weights
    assert not any(p.requires_grad for p in random_lm.parameters())
    assert torch.equal(outputs(load_captioner(tmp_path, lm=lm)), outputs(captioner))  # the same random LM again


def test_failed_save_leaves_the_previous_checkpoint_intact(lm, tokenizer, tmp_path, monkeypatch):
    """The second save dies half-way through writing optimizer.pt: the step-2 checkpoint is untouched, no litter."""
    kept = {}

    def snapshot(step, *_):
        if step == 2:
            kept.update({p.name: p.read_bytes() for p in tmp_path.iterdir()})
            monkeypatch.setattr(torch, "save", half_write)

    def half_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        train(CONFIG, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, progress=False, callback=snapshot)
    assert set(kept) == {"config.json", "trainable.safetensors", "optimizer.pt", "history.json"}
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == kept


def test_samples_are_printed_and_loss_curve_is_a_png(lm, tokenizer, run, tmp_path, capsys):
    _, history, _ = run
    train(replace(CONFIG, steps=1, warmup=0, sample_every=1), lm=lm, tokenizer=tokenizer, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("step 1:") == 2 and printed.count("truth:") == 2
    path = save_loss_curve(history, tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    with pytest.raises(ValueError, match="no losses"):
        save_loss_curve({"loss": []}, tmp_path / "empty.png")


def test_colour_swap_changes_the_inputs_colour_words_not_the_labels_and_resumes_exactly(lm, tokenizer, run,
                                                                                        tmp_path, monkeypatch):
    """With colour_swap the LM reads other colours at some colour words, the loss still wants the true ones; a run
    cut off and resumed swaps the same words as the whole run (the draws are a function of seed and step)."""
    from minivlm.captioner import Captioner
    from minivlm.data.captions import word_ids
    from minivlm.data.shapes import COLOURS

    _, unswapped, _ = run
    colours, seen, forward = word_ids(tokenizer, COLOURS), [], Captioner.forward

    def spy(self, images, input_ids, attention_mask=None, labels=None, **kwargs):
        seen.append((input_ids.clone(), labels.clone()))
        return forward(self, images, input_ids, attention_mask, labels, **kwargs)

    monkeypatch.setattr(Captioner, "forward", spy)
    config = replace(CONFIG, colour_swap=0.5)
    model, history = train(config, lm=lm, tokenizer=tokenizer, progress=False)
    assert len(seen) == config.steps and history["loss"] != unswapped["loss"]
    for ids, labels in seen:
        real = labels != -100
        changed = real & (ids != labels)
        assert changed.any()  # about half of each batch's colour words
        assert torch.isin(labels[changed], colours).all() and torch.isin(ids[changed], colours).all()
        assert changed.sum() < torch.isin(labels[real], colours).sum()  # not all of them

    def crash(step, *_):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, progress=False, callback=crash)
    resumed, resumed_history = train(config, lm=lm, tokenizer=tokenizer, out_dir=tmp_path, resume=True,
                                     progress=False)  # fmt: skip
    assert resumed_history == history
    want, got = learned_state(model), learned_state(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_the_cpu_presets_colour_swap_fits_its_lm():
    """The cpu preset swaps colour words (`colour_swap`), which needs each colour to be one token of its LM's BPE, or
    its first training step would fail (the tiny LM's BPE spells colours in several tokens: a clear error,
    tests/test_cli.py). `course_tokenizer` is the tokenizer the LM's pretraining trains, without the LM (seconds)."""
    from minivlm.data.captions import word_ids
    from minivlm.data.shapes import COLOURS
    from minivlm.lm import course_tokenizer

    preset = T.TRAIN_PRESETS["cpu"]
    assert preset.colour_swap == 0.3 and T.TRAIN_PRESETS["cpu-words"].colour_swap == 0.3
    assert preset.lm == "course"  # the course LM's cpu preset
    tokenizer = course_tokenizer("cpu")
    assert len(set(word_ids(tokenizer, COLOURS).tolist())) == len(COLOURS)
    assert all(T.TRAIN_PRESETS[name].colour_swap == 0 for name in ("tiny", "gpu", "gpu-224"))


@pytest.mark.parametrize(
    "field, value",
    [("lm_init", "frozen"), ("steps", 0), ("warmup", 4), ("batch_size", 0), ("train_images", 4), ("lr", 0.0),
     ("max_length", 1), ("sample_every", -1), ("checkpoint_every", 0), ("word_alignment", -0.1),
     ("word_alignment", float("nan")), ("length_groups", -1), ("colour_swap", -0.1), ("colour_swap", 1.5),
     ("colour_swap", float("nan"))],
)  # fmt: skip
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        replace(CONFIG, **{field: value})


def test_bad_arguments_are_refused(lm, tokenizer):
    with pytest.raises(ValueError, match="together"):
        train(CONFIG, lm=lm, progress=False)
    with pytest.raises(ValueError, match="out_dir"):
        train(CONFIG, lm=lm, tokenizer=tokenizer, resume=True, progress=False)
    with pytest.raises(ValueError, match="unknown training preset"):
        train("huge")


def test_course_captioner_trains_once_into_the_cache_then_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIVLM_CACHE", str(tmp_path / "cache"))
    trained, _ = train("tiny", progress=False)
    assert all(p.grad is None for p in trained.parameters())  # no gradient left over from the last step
    captioner, tokenizer, info = T.course_captioner("tiny", progress=False)
    assert "cached in" in capsys.readouterr().out
    assert len(info["history"]["loss"]) == T.TRAIN_PRESETS["tiny"].steps
    entries = [p.name for p in (tmp_path / "cache" / "captioner").iterdir()]
    assert entries == [Path(info["path"]).name] and entries[0].startswith("tiny-")  # no temporary folder left

    def no_training(*args, **kwargs):
        raise AssertionError("the cached captioner should be loaded, not trained again")

    monkeypatch.setattr(T, "train", no_training)
    again, _, info2 = T.course_captioner("tiny", progress=False)
    assert info2["history"] == info["history"]
    for (name, a), b in zip(learned_state(captioner).items(), learned_state(again).values()):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError, match="not trained again"):
        T.course_captioner("tiny", retrain=True, progress=False)
    assert (Path(info["path"]) / "trainable.safetensors").is_file()  # a failed retrain keeps the old entry
    assert [p.name for p in (tmp_path / "cache" / "captioner").iterdir()] == entries
    with pytest.raises(ValueError, match="unknown training preset"):
        T.course_captioner("huge")


def test_native_bf16_asks_the_cpu_for_avx512_bf16_or_amx_and_never_changes_auto(monkeypatch):
    """A GPU counts as native; a CPU by torch.cpu's checks, and not at all where this torch lacks them."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert T.native_bf16(cuda) and not T.native_bf16(torch.device("meta"))
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        assert T.native_bf16(cpu) == (avx512_bf16 or amx)
        assert not TrainConfig().bf16(cpu) and TrainConfig(precision="bf16").bf16(cpu)  # "auto": float32 on a CPU
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not T.native_bf16(cpu)  # an older torch without the checks: assume none
