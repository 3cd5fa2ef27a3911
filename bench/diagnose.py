"""Where the captioner loses: the vision side, or what the frozen LM can say? Four measurements.

The course captioner's errors are not spread evenly over the attributes (in the cpu preset, shape is
far behind colour and size). Four measurements locate each kind of error:

1. **By object count.** The trained captioner (`course_captioner`, from the cache) scored on test
   images with 1, 2 and 3 objects separately. One object needs no binding: an error there is about
   seeing or saying one attribute, not about keeping two objects apart.
2. **What the vision side knows.** Linear probes (logistic regression on frozen features) read from
   the trained encoder's features and from its prefix whether each shape and each colour is in the
   image, and how many large objects there are. The same probes on an encoder of the same
   architecture with random weights are the control: what untrained convolutions already expose.
   A probe that does no better on the trained encoder than on the random one means training did not
   teach the encoder that attribute.
3. **What the frozen LM can say.** An *oracle* vision side: the encoder is replaced by the scene's
   true attributes (one slot per shape: its colour, its size and its centre; and for each ordered pair
   of shapes, the relation a caption would state between them), and only the mapper is trained, with
   the preset's recipe (steps, batch, learning rate). This is the ceiling of a perfect encoder with
   this LM and mapper. Where the oracle is right and the real
   captioner is wrong, the encoder is to blame; where the oracle fails too, the LM (or the mapper) is.
4. **Frozen or not?** The same oracle, with a copy of the LM fine-tuned along with the mapper (the
   fine-tuned-LM control of Frozen's paper). If it says what the frozen oracle cannot, the LM's weights
   know how to; what fails is steering them through an input prefix alone.

Run from the repository root:
    .venv/bin/python bench/diagnose.py            # the cpu preset (10 minutes on 2 threads once the captioner is cached)
    .venv/bin/python bench/diagnose.py --quick    # the tiny preset: seconds, proves the script runs
    .venv/bin/python bench/diagnose.py --oracle-mapper linear --oracle-prefix 16   # another mapper for the oracle
    .venv/bin/python bench/diagnose.py --oracle-captions shuffled    # the oracles learn captions in random orders
    .venv/bin/python bench/diagnose.py --oracle-depth 4   # the oracle's prefix read by all 4 blocks, not the input only
    .venv/bin/python bench/diagnose.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.captioner import Captioner
from minivlm.cnn import build_encoder
from minivlm.data import shapes as S
from minivlm.data.captions import CaptionCollator, ShapesCaptions
from minivlm.evaluate import attribute_scores, true_captions
from minivlm.lm import learning_rate
from minivlm.train import TRAIN_PRESETS, batch_indices, course_captioner

SHOWN = ("exact match", "colour", "shape", "size", "relation")
SLOT = len(S.COLOURS) + 1 + len(S.SIZES) + 1 + 2  # per shape: colour or absent, size or absent, x, y
PAIRS = [(a, b) for a in S.SHAPES for b in S.SHAPES if a != b]  # ordered pairs of shapes
PAIR = len(S.RELATIONS) + 1  # per pair: the relation a caption would state between them, or none
PROBE_STEPS = 500  # full-batch Adam steps of each linear probe


def oracle_features(scene: S.Scene) -> Tensor:
    """The scene's truth as (4 * SLOT + 12 * PAIR,) numbers: each shape's colour, size and centre, each pair's relation.

    For each shape in S.SHAPES: its colour (or absent), its size (or absent) as one-hots, and its centre.
    For each ordered pair of shapes in the scene: the relation a caption naming them in that order
    would state (the world's own rule), or none, as a one-hot. So a caption in any order can be read off.
    """
    slots = torch.zeros(len(S.SHAPES), SLOT)
    slots[:, 0] = 1  # colour: absent
    slots[:, len(S.COLOURS) + 1] = 1  # size: absent
    for o in scene.objects:
        k = S.SHAPES.index(o.shape)
        slots[k, 0] = slots[k, len(S.COLOURS) + 1] = 0
        slots[k, 1 + S.COLOURS.index(o.colour)] = 1
        slots[k, len(S.COLOURS) + 2 + S.SIZES.index(o.size)] = 1
        slots[k, -2:] = torch.tensor([o.x, o.y])
    pairs = torch.zeros(len(PAIRS), PAIR)
    pairs[:, -1] = 1  # none
    objects = {o.shape: o for o in scene.objects}
    for k, (a, b) in enumerate(PAIRS):
        if a in objects and b in objects:
            stated = S.relation(objects[a], objects[b])
            if stated is not None:
                pairs[k] = 0
                pairs[k, S.RELATIONS.index(stated)] = 1
    return torch.cat([slots.flatten(), pairs.flatten()])


class OracleEncoder(nn.Module):
    """Takes `oracle_features` rows (B, F) in place of images and hands them on: a vision side that sees perfectly."""

    out_dim = len(S.SHAPES) * SLOT + len(PAIRS) * PAIR

    def forward(self, features: Tensor) -> Tensor:
        return features


def probe_targets(scenes: Sequence[S.Scene]) -> dict[str, Tensor]:
    """What the probes read: shape presence (N, 4), colour presence (N, 5), number of large objects (N,)."""
    shapes = torch.tensor([[float(any(o.shape == s for o in sc.objects)) for s in S.SHAPES] for sc in scenes])
    colours = torch.tensor([[float(any(o.colour == c for o in sc.objects)) for c in S.COLOURS] for sc in scenes])
    large = torch.tensor([sum(o.size == "large" for o in sc.objects) for sc in scenes])
    return {"shape present": shapes, "colour present": colours, "large objects": large}


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Test accuracy of a linear read-out trained on (train_x, train_y): binary labels (N, K), or classes (N,)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std  # standardised on the training rows
    classes = train_y.ndim == 1
    head = nn.Linear(train_x.shape[1], int(train_y.max()) + 1 if classes else train_y.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(PROBE_STEPS):
        logits = head(train_x)
        loss = F.cross_entropy(logits, train_y) if classes else F.binary_cross_entropy_with_logits(logits, train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = head(test_x)
    predicted = logits.argmax(-1) if classes else (logits > 0).float()
    return (predicted == test_y).float().mean().item()


def majority(train_y: Tensor, test_y: Tensor) -> float:
    """Accuracy of always answering the training rows' most common label (per column for binary labels)."""
    if train_y.ndim == 1:
        return (test_y == train_y.mode().values).float().mean().item()
    return (test_y == (train_y.mean(0) > 0.5).float()).float().mean().item()


def by_objects(predictions: Sequence[str], scenes: Sequence[S.Scene]) -> dict[str, dict[str, float]]:
    """Attribute scores of all images and of those with 1, 2 and 3 objects; each with its number of images."""
    groups: dict[str, list[int]] = {"all": list(range(len(scenes)))}
    for n in (1, 2, 3):
        groups[f"{n} object{'s' * (n > 1)}"] = [i for i, sc in enumerate(scenes) if len(sc.objects) == n]
    out = {}
    for name, rows in groups.items():
        if rows:
            scores = attribute_scores([predictions[i] for i in rows], [true_captions(scenes[i]) for i in rows])
            out[name] = {"images": len(rows), **scores}
    return out


def confusion(predictions: Sequence[str], scenes: Sequence[S.Scene]) -> dict[str, dict[str, int]]:
    """On one-object images: {true shape: {shape said (or "-" for none): count}}."""
    table = {shape: dict.fromkeys((*S.SHAPES, "-"), 0) for shape in S.SHAPES}
    for prediction, scene in zip(predictions, scenes):
        if len(scene.objects) == 1:
            said = S.try_parse(prediction)
            table[scene.objects[0].shape][said.objects[0][2] if said else "-"] += 1
    return table


def training_captions(scenes: Sequence[S.Scene], shuffled: bool, seed: int) -> list[str]:
    """The world's caption of each scene, or (shuffled) a random one of its true captions, drawn under `seed`."""
    if shuffled:
        rng = np.random.default_rng(seed)
        scenes = [(told := S.orders(sc))[rng.integers(len(told))] for sc in scenes]
    return [S.caption(sc) for sc in scenes]


def train_oracle(
    config, lm: nn.Module, tokenizer, progress: bool = False, train_lm: bool = False, shuffled: bool = False
) -> Captioner:
    """The oracle captioner: OracleEncoder and a fresh mapper, trained with the preset's recipe against the LM.

    The recipe's colour swap (`TrainConfig.colour_swap`) is not applied: it keeps a captioner from naming a shape from
    the colour before it, and the oracle's features state every shape exactly.

    train_lm=True is the control: a copy of the LM is fine-tuned along with the mapper (the `lm` passed
    in stays frozen and unchanged). Frozen against fine-tuned, with the same perfect features, tells
    whether what the oracle cannot say is out of reach of the LM's weights or only of its input prefix.
    shuffled=True tells each training scene in a random one of its true orders (`S.orders`) instead of the
    world's one canonical order (the leftmost object first), as the world itself did before: the control
    that shows what one caption per image is worth.
    """
    torch.manual_seed(config.seed)
    c = replace(config.captioner, train_lm=train_lm)
    captioner = Captioner.around(OracleEncoder(), copy.deepcopy(lm) if train_lm else lm, c).train()
    world = S.ShapesWorld("train", c.image_size, config.data_seed, config.train_images)
    scenes = [world.scene(i) for i in range(len(world))]
    features = torch.stack([oracle_features(sc) for sc in scenes])  # (N, F)
    captions = training_captions(scenes, shuffled, config.seed)
    collate = CaptionCollator(tokenizer, config.max_length)
    trained = captioner.trainable_parameters()  # the mapper's (and the LM copy's, with train_lm)
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr)  # fmt: skip
    for step in range(config.steps):
        rows = batch_indices(config.seed, step, len(scenes), config.batch_size).tolist()
        batch = collate([(features[i], captions[i]) for i in rows])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, peak=config.lr, warmup=config.warmup, steps=config.steps)
        loss = captioner(batch["images"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                         length_groups=config.length_groups).loss  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        optimizer.step()
        if progress and (step + 1) % 250 == 0:
            print(f"    oracle step {step + 1}/{config.steps}: loss {loss.item():.3f}", flush=True)
    return captioner.eval()


def generate(captioner: Captioner, inputs: Tensor, tokenizer, max_length: int, batch_size: int = 100) -> list[str]:
    """Greedy captions of `inputs` (images, or oracle features), in batches."""
    out = []
    for start in range(0, len(inputs), batch_size):
        out += [t.strip() for t in captioner.generate(inputs[start : start + batch_size], tokenizer, max_length)]
    return out


def print_scores(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title} (%)")
    print(f"{'images':<10} {'n':>5}  " + "  ".join(f"{m:>11}" for m in SHOWN))
    for name, scores in table.items():
        cells = "  ".join(f"{100 * scores[m]:>11.1f}" for m in SHOWN)
        print(f"{name:<10} {scores['images']:>5}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="TRAIN_PRESETS entry (default: cpu)")
    parser.add_argument("--images", type=int, default=600, help="test images scored (default: 600)")
    parser.add_argument("--probe-images", type=int, default=4000, help="training images of each probe (default: 4000)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--oracle-mapper", default=None, help="the oracle's mapper kind (default: the preset's)")
    parser.add_argument("--oracle-prefix", type=int, default=None,
                        help="the oracle's prefix length P (default: the preset's)")  # fmt: skip
    parser.add_argument("--oracle-depth", type=int, default=None,
                        help="blocks of the LM that read the oracle's prefix, K (default: the preset's; "
                             "1 is the input only, as in Frozen)")  # fmt: skip
    parser.add_argument("--oracle-captions", choices=("world", "shuffled"), default="world",
                        help="the oracles' training captions: the world's, one per image (the leftmost object "
                             "first; the default), or each scene in a random one of its true orders")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, few images and steps: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, n_test, n_probe = ("tiny", 30, 200) if args.quick else (args.preset, args.images, args.probe_images)
    if preset not in TRAIN_PRESETS or not TRAIN_PRESETS[preset].lm.startswith("course"):
        raise SystemExit(f"bench/diagnose.py needs a preset whose LM is the course LM, got {preset!r}")
    print(f"captioner preset {preset!r}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    config = TRAIN_PRESETS[preset]
    size = config.captioner.image_size
    test = S.ShapesWorld("test", size, 1, n_test)
    test_scenes = [test.scene(i) for i in range(n_test)]
    test_images = torch.stack([x for x, _ in ShapesCaptions(test)])  # (N, 3, S, S), as training fed them
    results: dict = {"preset": preset}

    # 1. the trained captioner, by object count
    captioner, tokenizer, _ = course_captioner(preset, progress=False)
    predictions = generate(captioner, test_images, tokenizer, config.max_length)
    results["captioner"] = by_objects(predictions, test_scenes)
    print_scores("1. the course captioner on test images, by object count", results["captioner"])
    results["shape_confusion"] = confusion(predictions, test_scenes)
    print("\none-object images: the true shape (rows) against the shape said (columns; '-': no shape said)")
    print(f"{'':>10} " + " ".join(f"{s:>9}" for s in (*S.SHAPES, "-")))
    for shape, row in results["shape_confusion"].items():
        print(f"{shape:>10} " + " ".join(f"{n:>9}" for n in row.values()))

    # 2. linear probes of the trained encoder, its prefix, and a random encoder of the same shape
    probe_world = S.ShapesWorld("train", size, 2, n_probe)  # other scenes than the captioner trained on
    probe_scenes = [probe_world.scene(i) for i in range(n_probe)]
    probe_images = torch.stack([x for x, _ in ShapesCaptions(probe_world)])
    c = config.captioner
    torch.manual_seed(config.seed)  # the init the trained encoder started from
    untrained = build_encoder(c.encoder, c.image_size, preset=c.cnn_preset).eval()
    sources = {"trained encoder": captioner.encoder, "trained prefix": captioner.prefix,
               "random encoder": untrained}  # fmt: skip
    train_targets, test_targets = probe_targets(probe_scenes), probe_targets(test_scenes)
    probes = {"majority": {k: majority(train_targets[k], test_targets[k]) for k in train_targets}}
    for name, read in sources.items():
        with torch.no_grad():
            train_x, test_x = read(probe_images).flatten(1), read(test_images).flatten(1)
        probes[name] = {k: linear_probe(train_x, train_targets[k], test_x, test_targets[k]) for k in train_targets}
    results["probes"] = probes
    print(f"\n2. linear probes, trained on {n_probe} images, tested on the {n_test} test images (accuracy %)")
    print(f"{'features':<16} " + "  ".join(f"{k:>15}" for k in train_targets))
    for name, row in probes.items():
        print(f"{name:<16} " + "  ".join(f"{100 * v:>15.1f}" for v in row.values()))

    # 3. the oracle: true attributes in, only the mapper trained
    lm = captioner.language_model  # the same frozen LM, already loaded (not a DeepPrefixLM around it)
    if args.quick:
        config = replace(config, steps=10, warmup=1)
    changes = {"mapper": args.oracle_mapper, "prefix_length": args.oracle_prefix, "prefix_depth": args.oracle_depth}
    config = replace(config, captioner=replace(config.captioner, **{k: v for k, v in changes.items() if v is not None}))
    results["oracle_captioner"] = {"mapper": config.captioner.mapper, "prefix_length": config.captioner.prefix_length,
                                   "prefix_depth": config.captioner.prefix_depth}
    start = time.perf_counter()
    shuffled = args.oracle_captions == "shuffled"
    results["oracle_captions"] = args.oracle_captions
    oracle = train_oracle(config, lm, tokenizer, progress=not args.quick, shuffled=shuffled)
    results["oracle_seconds"] = round(time.perf_counter() - start, 1)
    features = torch.stack([oracle_features(sc) for sc in test_scenes])
    results["oracle"] = by_objects(generate(oracle, features, tokenizer, config.max_length), test_scenes)
    print_scores(f"3. the oracle vision side ({config.captioner.mapper} mapper, P = {config.captioner.prefix_length}, "
                 f"read by {config.captioner.prefix_depth} block(s), "
                 f"{config.steps} steps, {args.oracle_captions} captions, {results['oracle_seconds']:.0f} s), "
                 f"by object count",
                 results["oracle"])  # fmt: skip

    # 4. the control: the same oracle with the LM fine-tuned as well
    start = time.perf_counter()
    tuned = train_oracle(config, lm, tokenizer, progress=not args.quick, train_lm=True, shuffled=shuffled)
    results["oracle_lm_tuned_seconds"] = round(time.perf_counter() - start, 1)
    results["oracle_lm_tuned"] = by_objects(generate(tuned, features, tokenizer, config.max_length), test_scenes)
    print_scores(f"4. the same oracle with the LM fine-tuned too (the control; {results['oracle_lm_tuned_seconds']:.0f} s)",
                 results["oracle_lm_tuned"])  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
