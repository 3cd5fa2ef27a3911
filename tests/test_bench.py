"""The benchmark scripts run end to end (on tiny sizes) and write their numbers; they time nothing themselves."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minivlm.cnn import CNNConfig
from minivlm.train import native_bf16

ROOT = Path(__file__).resolve().parents[1]


def quick_run(script: str, tmp_path: Path, *options: str) -> tuple[str, dict]:
    """Run `bench/<script> --quick --json [options]`; return what it printed and the numbers it wrote."""
    out = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", "--json", str(tmp_path / "bench.json"), *options],
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
    for line in ("pretraining time", "held-out perplexity", "copy, test captions", "copy, per attribute", "list copy",
                 "word similarity", "2-way, with task induction", "2-way, the query repeated"):
        assert line in stdout
    assert results["preset"] == "tiny" and results["heldout_perplexity"] > 1
    assert 0 <= results["list_copy"] <= 1
    ways = {(row["ways"], row["task_induction"]) for row in results["binding"]}
    assert ways == {(2, True), (2, False), (5, True), (5, False)}
    for row in [*results["binding"], results["binding_echo"]]:  # every kind of names, measured apart
        assert all(0 <= row[k] <= 1 for k in ("mixed", "course", "made_up"))
    _, other = quick_run("lm.py", tmp_path, "--seed", "1")  # another init and batch order: another model
    assert (results["seed"], other["seed"]) == (0, 1) and other["heldout_perplexity"] != results["heldout_perplexity"]


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


def test_captioner_ablation_covers_every_prefix_length_and_mapper(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    changes = [c for _, c in bench.rows("ablation")]
    assert {(c["prefix_length"], c["mapper"]) for c in changes} == {(p, m) for p in (1, 2, 4, 8)
                                                                   for m in ("linear", "mlp", "transformer")}


def test_captioner_stem_table_trains_the_preset_with_each_stem(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    assert [c for _, c in bench.rows("stem")] == [{"stem": 0}, {"stem": 16}, {"stem": 32}]
    from minivlm.cnn import CNN_PRESETS

    for stem in (0, 8):  # the entries a run adds are removed afterwards
        monkeypatch.setitem(CNN_PRESETS, f"tiny, stem {stem}", None)
    without, stem8 = (bench.run_one("tiny", 2, 4, {"stem": stem}) for stem in (0, 8))
    assert CNN_PRESETS["tiny, stem 8"] == replace(CNN_PRESETS["tiny"], stem=8)
    stem_weights = 3 * 8 * 9 + 2 * 8 + (8 - 3) * CNN_PRESETS["tiny"].widths[0] * 9  # the stem's conv and norm;
    # the first stage's convolution reads 8 channels instead of 3
    assert stem8["trained_parameters"] - without["trained_parameters"] == stem_weights
    assert set(stem8["metrics"]) == {"test", "heldout"}


def test_captioner_colour_table_trains_the_preset_with_and_without_a_colour_path(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    assert [c for _, c in bench.rows("colour")] == [{"colour": 0}, {"colour": 16}]
    from minivlm.cnn import CNN_PRESETS

    for colour in (0, 8):  # the entries a run adds are removed afterwards
        monkeypatch.setitem(CNN_PRESETS, f"tiny, colour {colour}", None)
    without, with_colour = (bench.run_one("tiny", 2, 4, {"colour": c}) for c in (0, 8))
    assert CNN_PRESETS["tiny, colour 8"] == replace(CNN_PRESETS["tiny"], colour=8)
    assert with_colour["trained_parameters"] > without["trained_parameters"]  # the colour path and the wider mapper
    assert set(with_colour["metrics"]) == {"test", "heldout"}


def test_captioner_swap_table_passes_colour_swap_to_training(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    assert [c for _, c in bench.rows("swap")] == [{"colour_swap": 0.0}, {"colour_swap": 0.3}]
    assert bench.run_one("tiny", 2, 4, {"colour_swap": 0.0})["colour_swap"] == 0.0
    with pytest.raises(ValueError, match="'red' is 2 tokens"):  # it reached train(): the tiny LM's BPE spells colours
        bench.run_one("tiny", 2, 4, {"colour_swap": 0.3})  # in several tokens, which cannot be swapped
    assert bench.cannot_run("swap", "tiny").startswith("'red' is 2 tokens")  # so --quick leaves the table out
    assert bench.cannot_run("pool", "tiny") is None


def test_captioner_pool_table_trains_the_preset_with_each_colour_pooling(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    assert [c for _, c in bench.rows("pool")] == [{"colour_pool": "mean"}, {"colour_pool": "max"}]
    from minivlm.cnn import CNN_PRESETS

    tiny = replace(CNN_PRESETS["tiny"], colour=8)  # the tiny preset has no colour path: give it one
    monkeypatch.setitem(CNN_PRESETS, "tiny", tiny)
    for pool in ("mean", "max"):  # the entries a run adds are removed afterwards
        monkeypatch.setitem(CNN_PRESETS, f"tiny, colour_pool {pool}", None)
    mean, most = (bench.run_one("tiny", 2, 4, {"colour_pool": pool}) for pool in ("mean", "max"))
    assert CNN_PRESETS["tiny, colour_pool max"] == replace(tiny, colour_pool="max")
    assert CNN_PRESETS["tiny, colour_pool mean"] == tiny  # the preset's own pooling: the preset
    assert mean["trained_parameters"] == most["trained_parameters"]  # pooling has no weights
    assert set(most["metrics"]) == {"test", "heldout"}


def test_captioner_cnn_table_trains_the_preset_with_cheaper_last_stages(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    from minivlm.cnn import CNN_PRESETS

    preset = CNN_PRESETS["cpu"]
    assert bench.rows("cnn")[0][1] == {"last_stage": [preset.widths[-1], preset.blocks[-1]]}  # the preset comes first
    assert len(bench.rows("cnn")) == len(set(bench.LAST_STAGES)) > 1
    tiny = CNN_PRESETS["tiny"]
    names = [f"tiny, widths {(*tiny.widths[:-1], c)}, blocks {(*tiny.blocks[:-1], n)}" for c, n in ((32, 1), (16, 2))]
    for name in names:  # the entries a run adds are removed afterwards
        monkeypatch.setitem(CNN_PRESETS, name, None)
    wide, narrow = (bench.run_one("tiny", 2, 4, {"last_stage": stage}) for stage in ([32, 1], [16, 2]))
    assert CNN_PRESETS[names[1]] == replace(tiny, widths=(8, 16, 16), blocks=(0, 1, 2))  # the earlier stages kept
    # twice the channels in one block against two blocks: the mapper reads the wider stage's channels in every cell
    assert wide["trained_parameters"] > narrow["trained_parameters"]
    assert set(narrow["metrics"]) == {"test", "heldout"}


def test_captioner_precision_table_trains_the_preset_in_float32_and_under_bf16_autocast(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    import minivlm.train

    assert [changes for _, changes in bench.rows("precision")] == [{"precision": "fp32"}, {"precision": "bf16"}]
    autocast, train = [], minivlm.train.train

    def spy(config, **kwargs):  # what each run trains with: bf16 autocast on the CPU or not
        autocast.append(config.bf16(torch.device("cpu")))
        return train(config, **kwargs)

    monkeypatch.setattr(minivlm.train, "train", spy)
    fp32, bf16 = (bench.run_one("tiny", 2, 4, changes) for _, changes in bench.rows("precision"))
    assert autocast == [False, True] and (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert set(bf16["metrics"]) == {"test", "heldout"}


def test_captioner_mapper_table_trains_the_preset_with_one_prefix_and_with_a_vector_per_cell(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    assert [c for _, c in bench.rows("mapper")] == [{"mapper": "mlp", "prefix_length": 4},
                                                    {"mapper": "linear", "prefix_length": 4},
                                                    {"mapper": "grid", "prefix_length": 16}]  # fmt: skip
    from minivlm.train import TRAIN_PRESETS

    preset = TRAIN_PRESETS["cpu"].captioner
    assert (preset.mapper, preset.prefix_length) == ("grid", 16)  # the table's last row is the preset
    one, per_cell = (bench.run_one("tiny", 2, 4, c) for _, c in bench.rows("mapper")[1:])
    assert per_cell["trained_parameters"] < one["trained_parameters"]  # one C x D map shared by the 16 cells
    assert set(per_cell["metrics"]) == {"test", "heldout"}


def test_captioner_budget_table_trains_the_preset_on_a_share_of_its_images(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    from minivlm.train import TRAIN_PRESETS

    preset = TRAIN_PRESETS["cpu"]
    assert (preset.steps, preset.batch_size, preset.train_images) == (2_800, 64, 179_200)  # the labels' arithmetic
    rows = [c for _, c in bench.rows("budget")]
    assert rows[0] == {}  # the preset itself
    tiny = TRAIN_PRESETS["tiny"]  # 40 steps of 16 on 512 images, lr 3e-3
    same, half = (bench.run_one("tiny", None, 4, c) for c in rows[1:])
    assert (same["steps"], same["batch_size"], same["train_images"]) == (17, 16, 219)  # 3/7 of the steps and images
    assert (half["steps"], half["batch_size"], half["train_images"]) == (34, 8, 219)  # as many images, in 2x the steps
    assert same["lr"] == half["lr"] and math.isclose(same["lr"], 2.5 * tiny.lr)
    assert same["seed"] == tiny.seed and bench.run_one("tiny", 2, 4, {**rows[2], "seed": 1})["seed"] == 1
    assert set(half["metrics"]) == {"test", "heldout"}


def test_captioner_depth_table_gives_every_block_its_own_prefix(monkeypatch):
    bench = load_bench("captioner.py", monkeypatch)
    assert [c for _, c in bench.rows("depth")] == [{"prefix_depth": 1}, {"prefix_depth": 2}, {"prefix_depth": "every"}]
    shallow, every = (bench.run_one("tiny", 2, 4, {"prefix_depth": k}) for k in (1, "every"))
    from minivlm.captioner import CAPTIONER_PRESETS
    from minivlm.cnn import CNN_PRESETS
    from minivlm.lm import LM_PRESETS

    c, d = CAPTIONER_PRESETS["tiny"], LM_PRESETS["tiny"].n_embd  # the tiny LM has 2 blocks: "every" is 2
    features = CNN_PRESETS[c.cnn_preset].out_dim
    assert every["trained_parameters"] - shallow["trained_parameters"] == (features + 1) * c.prefix_length * d  # a
    # linear mapper's second set of P vectors
    assert set(every["metrics"]) == {"test", "heldout"}


def load_bench(script: str, monkeypatch):
    """Import bench/<script> as a module (bench/ on sys.path, as when it runs as a script)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{script.removesuffix('.py')}", ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_perf_benchmark_quick_run_prints_every_ratio(tmp_path):
    stdout, results = quick_run("perf.py", tmp_path)
    for heading in ("1. GPT-2 forward", "2. Greedy generation", "3. Beam search", "4. Captioner training"):
        assert heading in stdout
    assert results["forward"]["hf_over_ours"] > 0 and results["forward"]["max_abs_logit_diff"] < 1e-4
    for row in results["generation"]:  # our decoding, with and without the cache, and transformers': same tokens
        assert row["identical_tokens"] and row["ours_over_hf"] > 0 and row["cached_over_uncached"] > 0
    assert results["beam"]["identical_beams"] and results["beam"]["cached_over_uncached"] > 0
    assert [t["setup"] for t in results["training"]] == ["tiny", "gpu-tiny"]  # the shapes world, and random data
    for t in results["training"]:
        frozen, tuned = t["frozen"], t["fine_tuned"]
        assert tuned["trained_parameters"] > frozen["trained_parameters"]
        assert tuned["flops_per_image"] > frozen["flops_per_image"] > 0  # the LM's weight gradients cost FLOPs
        assert tuned["step_memory_mb"] > frozen["step_memory_mb"] > 0  # the LM's gradients and AdamW state
        for r in (frozen, tuned):
            assert r["images_per_s"] > 0 and r["mfu"] is None  # no datasheet peak for a CPU
            assert math.isclose(r["achieved_tflops"] * 1e12, r["flops_per_image"] * r["images_per_s"], rel_tol=1e-9)
    tiny = results["training"][0]  # shapes-world captions in 2 length groups: the padding they skip is not computed
    assert tiny["padded"]["flops_per_image"] > tiny["frozen"]["flops_per_image"]
    assert tiny["saves"]["length_groups_speed"] > 0 and results["training"][1]["padded"] is None
    # its prefix is read by both blocks of the tiny LM: as keys and values, positions 0 .. P-2 skip the rest of the LM
    assert tiny["whole_prefix"]["flops_per_image"] > tiny["frozen"]["flops_per_image"]
    assert tiny["saves"]["prefix_cache_speed"] > 0 and results["training"][1]["whole_prefix"] is None
    for t in results["training"]:  # on a CPU with bfloat16 instructions, each setup under bf16 autocast too
        bf16 = t["bf16_autocast"]
        assert (bf16 is not None) == native_bf16(torch.device("cpu"))
        if bf16 is not None:  # the same FLOPs, in bfloat16, compared with a bfloat16 matrix product
            assert bf16["flops_per_image"] == t["frozen"]["flops_per_image"] and t["saves"]["bf16_speed"] > 0
            assert t["matmul_bf16"]["dtype"] == "bfloat16" and t["matmul"]["dtype"] == "float32"


def test_perf_flop_count_is_the_textbook_formula(monkeypatch):
    """The MFU's numerator: a frozen LM's forward costs 2 x matmul params x tokens + attention; fine-tuning
    adds exactly the weight gradients, 2 x params x tokens more."""
    import torch

    import numpy as np
    import torch

    from minivlm.captioner import CAPTIONER_PRESETS, Captioner
    from minivlm.gpt2 import GPT2, GPT2Config

    perf = load_bench("perf.py", monkeypatch)
    b, t, p = 3, 5, CAPTIONER_PRESETS["tiny"].prefix_length
    ids = torch.randint(0, 128, (b, t))
    batch = dict(images=torch.rand(b, 3, 32, 32), input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    counts = {}
    for train_lm in (False, True):
        torch.manual_seed(0)
        lm = GPT2(GPT2Config.from_preset("tiny"))
        captioner = Captioner.from_config(lm, replace(CAPTIONER_PRESETS["tiny"], train_lm=train_lm))
        counts[train_lm] = perf.count_flops(captioner.train(), batch, bf16=False, length_groups=0)
    d, layers, vocab, n = 32, 2, 128, p + t  # the tiny preset: D, blocks, V; N positions per row
    matmul_params = layers * 12 * d * d + vocab * d  # per block c_attn 3D², c_proj D², MLP 8D²; the output layer
    attention = layers * 4 * n * n * d  # Q Kᵀ and weights · V, every query against every key
    (frozen, parts), (tuned, _) = counts[False], counts[True]
    assert parts["lm"] == b * (2 * n * matmul_params + attention)
    assert tuned - frozen == b * 2 * n * matmul_params
    assert parts["encoder"] > 0 and frozen > sum(parts.values())


def test_perf_step_memory_is_the_peak_of_live_tensors(monkeypatch):
    import torch

    perf = load_bench("perf.py", monkeypatch)
    kept = []

    def step():
        scratch = torch.empty(1_000_000)  # 4 MB, freed before the step ends
        kept.append(torch.empty(250_000))  # 1 MB, kept (as AdamW keeps its state)
        del scratch

    assert perf.step_memory(step, torch.device("cpu")) == 5_000_000  # both alive at once
    assert perf.step_memory(lambda: None, torch.device("cpu")) == 0


def test_fewshot_benchmark_quick_run_reports_every_cell(tmp_path):
    stdout, results = quick_run("fewshot.py", tmp_path)
    assert "fast binding (% right)" in stdout and "visual question answering (% right)" in stdout
    assert results["preset"] == "tiny" and len(results["binding"]) == 29 and len(results["vqa"]) == 6
    assert results["word_view"] == 0 and all(row["words"] == "none" for row in results["binding"])  # tiny has none
    for row in results["binding"] + results["vqa"]:
        assert 0 < row["chance"] <= 0.5
        for mode in ("images", "blind", "text"):
            assert row[mode] is None or 0 <= row[mode]["open"] <= 1 and 0 <= row[mode]["rank"] <= 1
    assert sum(row["images"] is not None for row in results["binding"]) >= 20  # most prompts fit the context


def test_fewshot_benchmark_shows_images_in_words_where_the_captioner_has_a_word_view(monkeypatch):
    bench = load_bench("fewshot.py", monkeypatch)
    import numpy as np
    import torch

    from minivlm.captioner import CAPTIONER_PRESETS, Captioner
    from minivlm.data.episodes import binding_episode
    from minivlm.lm import load_frozen_lm

    lm, tokenizer = load_frozen_lm("course:tiny")
    rng = np.random.default_rng(0)
    episodes = [binding_episode(rng, 2, 1) for _ in range(4)]
    torch.manual_seed(0)
    viewed = Captioner.from_config(lm, replace(CAPTIONER_PRESETS["tiny"], word_view=5)).eval()
    out = bench.measure(viewed, tokenizer, episodes, 32, False)
    assert set(out) == {"chance", *bench.COLUMNS} and 0 <= out["words"]["open"] <= 1 and 0 <= out["words"]["rank"] <= 1
    assert bench.measure(Captioner.from_config(lm, "tiny").eval(), tokenizer, episodes, 32, False)["words"] == "none"
    assert "-" in bench.table("t", ["row"], [{**out, "words": "none"}]).splitlines()[-1].split()


def test_diagnose_quick_run_prints_the_four_measurements(tmp_path):
    stdout, results = quick_run("diagnose.py", tmp_path, "--oracle-captions", "shuffled", "--oracle-depth", "2")
    for heading in ("1. the course captioner", "2. linear probes", "3. the oracle vision side", "4. the same oracle"):
        assert heading in stdout
    assert results["oracle_captions"] == "shuffled" and "shuffled captions" in stdout
    assert results["oracle_captioner"]["prefix_depth"] == 2 and "read by 2 block(s)" in stdout  # the tiny LM's 2
    for part in ("captioner", "oracle", "oracle_lm_tuned"):
        table = results[part]
        assert set(table) <= {"all", "1 object", "2 objects", "3 objects"} and "all" in table
        assert sum(row["images"] for name, row in table.items() if name != "all") == table["all"]["images"] == 30
    ones = results["captioner"].get("1 object", {"images": 0})["images"]
    assert sum(sum(row.values()) for row in results["shape_confusion"].values()) == ones
    assert set(results["probes"]) == {"majority", "trained encoder", "trained prefix", "random encoder"}
    for row in results["probes"].values():
        assert set(row) == {"shape present", "colour present", "large objects"}
        assert all(0 <= v <= 1 for v in row.values())


def test_diagnose_oracle_features_hold_each_shapes_attributes(monkeypatch):
    bench = load_bench("diagnose.py", monkeypatch)
    from minivlm.data import shapes as S

    scene = S.Scene((S.Obj("circle", "blue", "large", 0.25, 0.5), S.Obj("square", "red", "small", 0.75, 0.5)),
                    ("to the left of",))  # fmt: skip
    features = bench.oracle_features(scene)
    assert features.shape == (bench.OracleEncoder.out_dim,)
    slots = features[: len(S.SHAPES) * bench.SLOT].view(len(S.SHAPES), bench.SLOT)
    pairs = features[len(S.SHAPES) * bench.SLOT :].view(len(bench.PAIRS), bench.PAIR)
    colours, sizes, where = slots[:, : len(S.COLOURS) + 1], slots[:, len(S.COLOURS) + 1 : -2], slots[:, -2:]
    assert colours.sum(1).tolist() == [1, 1, 1, 1] and sizes.sum(1).tolist() == [1, 1, 1, 1]  # one-hots
    assert colours[0].argmax() == 1 + S.COLOURS.index("blue") and sizes[0].argmax() == 1 + S.SIZES.index("large")
    assert colours[1].argmax() == 1 + S.COLOURS.index("red") and sizes[1].argmax() == 1 + S.SIZES.index("small")
    assert colours[2].argmax() == 0 and colours[3].argmax() == 0  # triangle and diamond: absent
    assert where[0].tolist() == [0.25, 0.5] and where[1].tolist() == [0.75, 0.5] and where[2:].abs().sum() == 0
    stated = {pair: S.RELATIONS[row.argmax()] for pair, row in zip(bench.PAIRS, pairs) if row[-1] == 0}
    assert stated == {("circle", "square"): "to the left of", ("square", "circle"): "to the right of"}
    assert pairs.sum(1).tolist() == [1] * len(bench.PAIRS)


def test_diagnose_confusion_counts_one_object_images_only(monkeypatch):
    bench = load_bench("diagnose.py", monkeypatch)
    from minivlm.data import shapes as S

    one = S.Scene((S.Obj("circle", "blue", "large", 0.5, 0.5),), ())
    two = S.Scene((S.Obj("circle", "blue", "large", 0.25, 0.5), S.Obj("square", "red", "small", 0.75, 0.5)),
                  ("to the left of",))  # fmt: skip
    table = bench.confusion(["a large blue square.", "not a caption", "a large blue circle."], [one, one, two])
    assert table["circle"] == {"circle": 0, "square": 1, "triangle": 0, "diamond": 0, "-": 1}
    assert sum(sum(row.values()) for row in table.values()) == 2


def test_diagnose_linear_probe_reads_what_is_linear_and_not_what_is_absent(monkeypatch):
    import torch

    bench = load_bench("diagnose.py", monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=g)
    binary = (x[:, :2] > 0).float()  # (N, 2): linear in x
    classes = (x[:, 0] > -0.5).long() + (x[:, 0] > 0.5).long()  # (N,): 0, 1 or 2, slabs along x_0
    noise = (torch.rand(600, 2, generator=g) > 0.5).float()  # independent of x
    assert bench.linear_probe(x[:400], binary[:400], x[400:], binary[400:]) > 0.95
    assert bench.linear_probe(x[:400], classes[:400], x[400:], classes[400:]) > 0.9
    assert bench.linear_probe(x[:400], noise[:400], x[400:], noise[400:]) < 0.65
    assert bench.majority(classes[:400], classes[400:]) == (classes[400:] == 1).float().mean().item()


def test_diagnose_oracle_fine_tunes_a_copy_of_the_lm_and_leaves_the_frozen_one_alone(monkeypatch):
    import torch

    bench = load_bench("diagnose.py", monkeypatch)

    from minivlm.lm import load_frozen_lm
    from minivlm.train import TRAIN_PRESETS

    lm, tokenizer = load_frozen_lm("course:tiny")
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    config = replace(TRAIN_PRESETS["tiny"], steps=3, warmup=1, train_images=64)
    frozen = bench.train_oracle(config, lm, tokenizer)
    tuned = bench.train_oracle(config, lm, tokenizer, train_lm=True)
    assert frozen.lm is lm and tuned.lm is not lm
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())  # the LM passed in: untouched
    assert not any(p.requires_grad for p in lm.parameters())
    moved = [k for k, v in tuned.lm.state_dict().items() if not torch.equal(before[k], v)]
    assert moved and all(p.requires_grad for p in tuned.lm.parameters())  # the copy did train


def test_diagnose_shuffled_captions_are_true_captions_in_random_orders(monkeypatch):
    bench = load_bench("diagnose.py", monkeypatch)
    from minivlm.data import shapes as S
    from minivlm.evaluate import true_captions

    scenes = [S.sample_scene("train", 0, i) for i in range(200)]
    assert bench.training_captions(scenes, False, 0) == [S.caption(sc) for sc in scenes]
    shuffled = bench.training_captions(scenes, True, 0)
    assert shuffled == bench.training_captions(scenes, True, 0)  # the same draw under the same seed
    assert all(c in true_captions(sc) for c, sc in zip(shuffled, scenes))
    moved = sum(c != S.caption(sc) for c, sc in zip(shuffled, scenes))
    assert 50 < moved < 150  # multi-object scenes (two in three) in another order about half the time or more


def test_errors_quick_run_prints_the_four_measurements(tmp_path):
    stdout, results = quick_run("errors.py", tmp_path)
    for heading in ("1. exact match by the number of objects", "2. kinds of wrong caption", "3. the held-out pair",
                    "4. the same scenes with one object repainted"):
        assert heading in stdout
    assert set(results["by_count"]) == {"test", "heldout"} and results["images"] == 60
    for split in ("test", "heldout"):
        kinds = results["kinds"][split]
        assert math.isclose(sum(kinds[k] for k in kinds if k.startswith(("objects right", "size", "colour", "shape",
                                                                          "number", "not a"))
                                and "within" not in k), kinds["wrong"])  # fmt: skip
        assert sum(row["images"] for row in results["by_count"][split].values()) == 60
    held = results["held_out"]
    assert sum(row["objects"] for row in held["by_count"].values()) == 60  # one held-out object per scene
    assert all(0 <= p <= 1 for p in held["probe"].values())
    painted = results["painted"]["held-out object painted purple"]
    assert painted and all(row["scenes"] > 0 and 0 <= row["after"] <= 1 for row in painted.values())


def near_threshold_scene(bench, gap_short_by: float):
    """Three small objects in a row; the last two boxes are `gap_short_by` pixels (at 32 px) closer than GAP allows.

    So the blue square and the green triangle stand in no clear relation, no caption may name them one after the
    other, and the world starts from the square: "... square to the right of ... circle, which is to the left of ..."
    """
    S = bench.S
    a = S.Obj("circle", "red", "small", 0.2, 0.5)
    b = S.Obj("square", "blue", "small", 0.5, 0.5)
    c = S.Obj("triangle", "green", "small", 0.5 + 2 * S.RADIUS["small"] + S.GAP - gap_short_by / 32, 0.5)
    return S.canonical(S.Scene((a, b, c), ("to the left of", "to the left of")))


def test_errors_kinds_name_what_a_wrong_caption_gets_wrong(monkeypatch):
    bench = load_bench("errors.py", monkeypatch)
    scene = near_threshold_scene(bench, 0.3)
    truth = bench.S.caption(scene)
    assert truth.startswith("a small blue square to the right of a small red circle") and bench.error_kind(
        truth, scene) is None  # fmt: skip
    in_a_row = "a small red circle to the left of a small blue square, which is to the left of a small green triangle."
    assert bench.error_kind(in_a_row, scene) == bench.KINDS[0]  # every object right; B, C too close to be neighbours
    assert bench.error_kind(truth.replace("small blue square", "large blue square"), scene) == "size wrong"
    assert bench.error_kind(truth.replace("red circle", "purple circle"), scene) == "colour wrong"
    assert bench.error_kind(truth.replace("green triangle", "green diamond"), scene) == "shape wrong"
    named_twice = truth.replace("green triangle", "blue square")  # a true object twice, the triangle never
    assert bench.error_kind(named_twice, scene) in ("colour wrong", "shape wrong")
    assert bench.error_kind("a small red circle.", scene) == "number of objects"
    assert bench.error_kind("a red a red", scene) == "not a caption"
    # in any order, the row names all three objects right; one colour wrong names two; no caption, none
    said = [in_a_row, truth.replace("red circle", "purple circle"), "a red a red"]
    assert bench.objects_named(said, [scene] * 3) == (3 + 2 + 0) / 9


def test_errors_a_caption_true_after_moving_the_objects_a_fraction_of_a_pixel(monkeypatch):
    bench = load_bench("errors.py", monkeypatch)
    in_a_row = "a small red circle to the left of a small blue square, which is to the left of a small green triangle."
    scene = near_threshold_scene(bench, 0.3)  # the square and triangle 0.3 px too close to be neighbours
    assert bench.true_after_moving(in_a_row, scene, 0.5, 32)  # moved apart by up to 2 x 0.5 px, they are
    assert not bench.true_after_moving(in_a_row, scene, 0.1, 32)  # by up to 0.2 px, not yet
    far = near_threshold_scene(bench, 3.0)  # 3 px too close: no half-pixel move makes the caption true
    assert not bench.true_after_moving(in_a_row, far, 0.5, 32)
    kinds = bench.kinds_of_error([in_a_row, bench.S.caption(scene)], [scene, scene], 32)
    assert kinds["wrong"] == 0.5 and kinds[bench.KINDS[0]] == 0.5
    assert kinds[f"{bench.KINDS[0]}, true within 0.5 px"] == 0.5 and kinds[f"{bench.KINDS[0]}, true within 1 px"] == 0.5


def test_errors_held_out_shapes_and_the_probe_rows(monkeypatch):
    bench = load_bench("errors.py", monkeypatch)
    S = bench.S
    alone = S.Scene((S.Obj("triangle", "red", "large", 0.3, 0.6),), ())
    diamond, circle = S.Obj("diamond", "green", "small", 0.2, 0.5), S.Obj("circle", "yellow", "large", 0.7, 0.5)
    pair = S.canonical(S.Scene((diamond, circle), ("to the left of",)))
    said = [S.caption(alone), S.caption(pair).replace("green diamond", "green circle")]
    held = bench.held_out_shapes(said, [alone, pair])
    assert held["by_count"] == {1: {"objects": 1, "shape right": 1.0}, 2: {"objects": 1, "shape right": 0.0}}
    assert held["wrong_shapes"]["green diamond"] == {"circle": 1} and held["wrong_shapes"]["red triangle"] == {}
    assert bench.shape_said("no caption", "red") == "-"
    assert bench.centre_cell(alone.objects[0], 4) == 2 * 4 + 1  # row 2 (y = 0.6), column 1 (x = 0.3)
    assert bench.centre_cell(replace(circle, x=1.0, y=1.0), 4) == 15  # the far edge is in the last cell
    encoder = bench.SmallCNN(CNNConfig(widths=(8, 16, 32), blocks=(0, 1, 1), colour=8))  # a cell: 32 + 8 features
    features = torch.arange(2 * encoder.out_dim, dtype=torch.float32).reshape(2, encoder.out_dim)
    rows, shapes = bench.cell_rows(features, [alone, pair], encoder, lambda o: True)
    assert rows.shape == (3, 32) and shapes.tolist() == [S.SHAPES.index(s) for s in ("triangle", "diamond", "circle")]
    assert torch.equal(rows[0], features[0, 9 * 40 : 9 * 40 + 32])  # cell 9 of image 0, its shape channels only
    rows, _ = bench.cell_rows(features, [alone, pair], encoder, lambda o: (o.colour, o.shape) in S.HELD_OUT_PAIRS)
    assert len(rows) == 2 and torch.equal(rows[1], features[1, 8 * 40 : 8 * 40 + 32])  # the green diamond's cell


def test_errors_repaints_one_object_and_nothing_else(monkeypatch):
    bench = load_bench("errors.py", monkeypatch)
    S = bench.S
    diamond, circle = S.Obj("diamond", "green", "small", 0.2, 0.5), S.Obj("circle", "purple", "large", 0.7, 0.5)
    held = S.canonical(S.Scene((diamond, circle), ("to the left of",)))  # a held-out scene: a green diamond
    assert bench.repainted(held, diamond, "purple") is None  # the circle is purple already: skipped
    painted = bench.repainted(held, diamond, "red")
    assert [o.colour for o in painted.objects] == ["red", "purple"] and painted.relations == held.relations
    assert [(o.shape, o.size, o.x, o.y) for o in painted.objects] == [(o.shape, o.size, o.x, o.y) for o in held.objects]
    triangle = S.Obj("triangle", "red", "small", 0.2, 0.5)
    test = S.canonical(S.Scene((triangle, circle), ("to the left of",)))  # a test scene with a purple circle
    pairs = bench.painted_pairs({"heldout": [held, S.Scene((S.Obj("square", "yellow", "small", 0.5, 0.5),), ())],
                                 "test": [test]})  # fmt: skip
    split, purple = pairs["held-out object painted purple"]
    assert split == "heldout" and len(purple) == 1  # the first scene is skipped: its circle is purple already
    assert purple[0][0] == 1 and purple[0][2] == 0 and purple[0][1].objects[0].colour == "purple"
    split, [(i, after, j)] = pairs["purple object painted its held-out colour"]
    assert (split, i, j) == ("test", 0, 1) and test.objects[j] == circle
    assert after.objects[j].colour == "blue" == bench.HELD_OUT_COLOUR["circle"]
    images = bench.images_of([test, after], 32)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    world = S.ShapesWorld("test", 32, 1, 1)
    assert torch.equal(bench.images_of([world.scene(0)], 32)[0], bench.ShapesCaptions(world)[0][0])  # as training
    blue = S.canonical(S.Scene((replace(triangle, colour="blue"), circle), ("to the left of",)))
    assert bench.painted_pairs({"heldout": [], "test": [blue]})["purple object painted its held-out colour"] == (
        "test", [])  # the triangle is blue already: skipped
