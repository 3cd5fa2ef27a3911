"""How the captioner's wrong captions are wrong, and where it loses the held-out pairs. Four measurements.

`bench/diagnose.py` found that the cpu captioner's errors are in scenes of three objects and, with an oracle
vision side, that the frozen LM could say them. This script looks at the wrong captions themselves, on the
test split and on the held-out compositions (the evaluation scenes of `minivlm.report`):

1. **By object count.** Exact match of scenes with 1, 2 and 3 objects, on each split.
2. **Kinds of wrong caption**, finer than `minivlm.evaluate.error_kinds`: every object named right (size,
   colour and shape) but told in an order or with relations the world does not allow; a size, colour or
   shape wrong; the wrong number of objects; no caption of the grammar. The world's rules decide order and
   relation on thresholds ("to the left of" needs the centres within 27° of level and the boxes GAP apart; a
   three-object scene starts with the leftmost object that begins a chain of clear relations), which a
   32-pixel image shows only to a fraction of a pixel. So for each caption with every object right, it asks
   whether the caption is a true caption of the same scene with each centre moved by -d, 0 or +d along x
   and along y, d half a pixel (or one pixel): those errors are the world's thresholds more than the
   captioner's sight. Last, the share of objects named right (size, colour and shape) in any order:
   `evaluate`'s per-attribute scores compare objects at the same place in the caption, so an order the
   world does not allow costs attributes too.
3. **The held-out pairs.** Each held-out scene holds one object of a colour–shape pair no training image
   has (a red triangle, ...). The shape the caption gives that object (the shape of the object it names in
   that colour), by the number of objects in the scene: alone in its image, the pair needs no binding of
   colour to shape. And a linear probe that reads an object's shape from the encoder's features of the grid
   cell under its centre, trained on objects of training scenes and tested on the held-out objects: if it
   reads their shape where the caption misnames it, the encoder saw the shape and the loss is downstream,
   where the mapper and the LM pair colours with shapes.
4. **Is it the colour?** The same held-out scenes with the held-out object painted purple (training images
   pair purple with every shape; skipped where another object is purple), and, the other way round, test
   scenes with a purple object painted the colour no training image gives its shape (a purple triangle
   turned red, ...; skipped where another object has that colour). Nothing else in the image changes: the
   colour-blind shape path sees the same shapes. If the shape is named right in purple and wrongly in the
   held-out colour, the colour is what misnames it.

Run from the repository root:
    .venv/bin/python bench/errors.py                            # the cpu preset's captioner, from the cache
    .venv/bin/python bench/errors.py --checkpoint runs/seed1    # a captioner `python -m minivlm train` wrote
    .venv/bin/python bench/errors.py --quick                    # the tiny preset: seconds, proves the script runs
    .venv/bin/python bench/errors.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from diagnose import generate, linear_probe
from minivlm.cnn import SmallCNN
from minivlm.data import shapes as S
from minivlm.data.captions import ShapesCaptions
from minivlm.evaluate import true_captions
from minivlm.lm import load_frozen_lm
from minivlm.report import EVAL_SEED, EVAL_SPLITS
from minivlm.train import course_captioner, load_captioner, read_config

KINDS = ("objects right, order or relation wrong", "size wrong", "colour wrong", "shape wrong", "number of objects",
         "not a caption")  # fmt: skip
MOVES = (0.5, 1.0)  # pixels: how far the objects may move for a wrong order or relation to become a true caption
COUNTS = (1, 2, 3)


def error_kind(prediction: str, scene: S.Scene) -> str | None:
    """None for a true caption of the scene; else the first of KINDS that fits (a caption may have several)."""
    if prediction.strip() in true_captions(scene):
        return None
    said = S.try_parse(prediction.strip())
    if said is None:
        return KINDS[5]
    true = S.describe(scene).objects
    if len(said.objects) != len(true):
        return KINDS[4]
    if sorted(said.objects) == sorted(true):
        return KINDS[0]
    extra, missing = Counter(said.objects) - Counter(true), Counter(true) - Counter(said.objects)
    wrong = set()  # fields in which a said object differs from the unnamed true object it is most like
    for obj in extra.elements():
        nearest = max(missing.elements(), key=lambda t: sum(a == b for a, b in zip(obj, t)))
        wrong |= {field for field, a, b in zip(("size", "colour", "shape"), obj, nearest) if a != b}
    return next(kind for kind in KINDS[1:4] if kind.split()[0] in wrong)


def moved_scenes(scene: S.Scene, pixels: float, image_size: int):
    """The scene's objects, each centre moved by -d, 0 or +d along x and along y (d = pixels), all 9^n ways."""
    d = pixels / image_size
    for shifts in itertools.product((-d, 0.0, d), repeat=2 * len(scene.objects)):
        yield tuple(replace(o, x=o.x + shifts[2 * i], y=o.y + shifts[2 * i + 1]) for i, o in enumerate(scene.objects))


def true_after_moving(prediction: str, scene: S.Scene, pixels: float, image_size: int) -> bool:
    """Is the prediction a true caption (in any order `shapes.orders` allows) of the scene moved by <= pixels?"""
    prediction = prediction.strip()
    for objects in moved_scenes(scene, pixels, image_size):
        told = S.orders(S.Scene(objects, ("above",) * (len(objects) - 1)))  # orders() reads relations afresh
        if any(S.caption(t) == prediction for t in told):
            return True
    return False


def kinds_of_error(predictions: Sequence[str], scenes: Sequence[S.Scene], image_size: int) -> dict:
    """{kind: share of all captions} and, for the first kind, the share true after moving the objects by MOVES."""
    each = [error_kind(p, sc) for p, sc in zip(predictions, scenes)]
    kinds, near = Counter(each), dict.fromkeys(MOVES, 0)
    for p, sc, kind in zip(predictions, scenes, each):
        if kind == KINDS[0]:
            for pixels in MOVES:
                near[pixels] += true_after_moving(p, sc, pixels, image_size)
    n = len(predictions)
    return {"wrong": 1 - kinds[None] / n, **{k: kinds[k] / n for k in KINDS},
            "objects named right, in any order (% of objects)": objects_named(predictions, scenes),
            **{f"{KINDS[0]}, true within {px:g} px": near[px] / n for px in MOVES}}  # fmt: skip


def objects_named(predictions: Sequence[str], scenes: Sequence[S.Scene]) -> float:
    """The share of all true objects that their caption names with size, colour and shape right, in any order.

    `minivlm.evaluate.attribute_scores` compares objects at the same place in caption order, so a caption told in an
    order the world does not allow loses attributes it got right; this does not.
    """
    named = total = 0
    for p, sc in zip(predictions, scenes):
        said = S.try_parse(p.strip())
        true = Counter(S.describe(sc).objects)
        named += sum((true & Counter(said.objects)).values()) if said else 0
        total += len(sc.objects)
    return named / total


def exact_by_count(predictions: Sequence[str], scenes: Sequence[S.Scene]) -> dict[int, dict[str, float]]:
    """{objects: {"images": n, "exact match": share}} over the scenes with 1, 2 and 3 objects."""
    out = {}
    for k in COUNTS:
        rows = [i for i, sc in enumerate(scenes) if len(sc.objects) == k]
        if rows:
            right = sum(predictions[i].strip() in true_captions(scenes[i]) for i in rows)
            out[k] = {"images": len(rows), "exact match": right / len(rows)}
    return out


def held_out_object(scene: S.Scene) -> S.Obj:
    """The object of a held-out scene whose colour–shape pair no training image has."""
    return next(o for o in scene.objects if (o.colour, o.shape) in S.HELD_OUT_PAIRS)


def shape_said(prediction: str, colour: str) -> str:
    """The shape the caption gives its object of this colour; "-" when it names none (or is no caption)."""
    said = S.try_parse(prediction.strip())
    return next((shape for _, c, shape in said.objects if c == colour), "-") if said else "-"


def held_out_shapes(predictions: Sequence[str], scenes: Sequence[S.Scene]) -> dict:
    """Held-out objects named with their shape, by object count; and per pair, the shapes said (wrong ones)."""
    right, total = Counter(), Counter()
    wrong: dict[str, Counter] = {f"{c} {s}": Counter() for c, s in S.HELD_OUT_PAIRS}
    for p, sc in zip(predictions, scenes):
        obj = held_out_object(sc)
        said = shape_said(p, obj.colour)
        total[len(sc.objects)] += 1
        right[len(sc.objects)] += said == obj.shape
        if said != obj.shape:
            wrong[f"{obj.colour} {obj.shape}"][said] += 1
    by_count = {k: {"objects": total[k], "shape right": right[k] / total[k]} for k in COUNTS if total[k]}
    return {"by_count": by_count, "wrong_shapes": {pair: dict(c.most_common()) for pair, c in wrong.items()}}


HELD_OUT_COLOUR = {shape: colour for colour, shape in S.HELD_OUT_PAIRS}  # the colour no training image gives it
FREE = "purple"  # the colour training images pair with every shape


def repainted(scene: S.Scene, obj: S.Obj, colour: str) -> S.Scene | None:
    """The scene with `obj` painted `colour` and nothing else changed; None if another object has that colour."""
    if any(o.colour == colour for o in scene.objects if o is not obj):
        return None
    return S.Scene(tuple(replace(o, colour=colour) if o is obj else o for o in scene.objects), scene.relations)


def images_of(scenes: Sequence[S.Scene], image_size: int) -> Tensor:
    """(N, 3, S, S) float images in [0, 1], as `ShapesCaptions` feeds them to training."""
    return torch.from_numpy(S.render_batch(scenes, image_size)).permute(0, 3, 1, 2).float() / 255


def painted_pairs(scenes: dict[str, Sequence[S.Scene]]) -> dict[str, tuple[str, list[tuple[int, S.Scene, int]]]]:
    """Both experiments of measurement 4: {name: (split, [(scene index, the scene repainted, object index)])}.

    "held-out object painted purple": each held-out scene's held-out object, in FREE; "purple object painted its
    held-out colour": each test scene's FREE object, in the colour no training image gives its shape.
    """
    purple, held_out = [], []
    for i, scene in enumerate(scenes["heldout"]):
        obj = held_out_object(scene)
        if (new := repainted(scene, obj, FREE)) is not None:
            purple.append((i, new, scene.objects.index(obj)))
    for i, scene in enumerate(scenes["test"]):
        obj = next((o for o in scene.objects if o.colour == FREE), None)
        if obj is not None and (new := repainted(scene, obj, HELD_OUT_COLOUR[obj.shape])) is not None:
            held_out.append((i, new, scene.objects.index(obj)))
    return {"held-out object painted purple": ("heldout", purple),
            "purple object painted its held-out colour": ("test", held_out)}


def centre_cell(obj: S.Obj, grid: int) -> int:
    """The index (row-major) of the grid cell under the object's centre."""
    return min(int(obj.y * grid), grid - 1) * grid + min(int(obj.x * grid), grid - 1)


def cell_rows(features: Tensor, scenes: Sequence[S.Scene], encoder: SmallCNN, only) -> tuple[Tensor, Tensor]:
    """For every object that `only(object)` keeps: the features of the cell under its centre, and its shape.

    features: (N, F) the encoder's, F = cells x C, C = the shape path's channels then the colour path's;
    only the shape path's channels are kept, the part of the features the colour-blind layers write.
    """
    grid = encoder.config.grid
    cells = features.reshape(len(scenes), grid * grid, -1)[:, :, : encoder.config.widths[-1]]  # (N, cells, C)
    rows, shapes = [], []
    for i, scene in enumerate(scenes):
        for obj in filter(only, scene.objects):
            rows.append(cells[i, centre_cell(obj, grid)])
            shapes.append(S.SHAPES.index(obj.shape))
    return torch.stack(rows), torch.tensor(shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder written by `python -m minivlm "
                        "train` (default: the preset's captioner, from the cache)")  # fmt: skip
    parser.add_argument("--preset", default="cpu", help="TRAIN_PRESETS entry, without --checkpoint (default: cpu)")
    parser.add_argument("--images", type=int, default=1000, help="images scored per split (default: 1000)")
    parser.add_argument("--probe-images", type=int, default=4000, help="training images of the probe (default: 4000)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, few images: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_images, n_probe = (60, 200) if args.quick else (args.images, args.probe_images)
    if args.checkpoint:
        config = read_config(args.checkpoint)
        captioner, tokenizer = load_captioner(args.checkpoint), load_frozen_lm(config.lm)[1]
        source = args.checkpoint
    else:
        preset = "tiny" if args.quick else args.preset
        captioner, tokenizer, info = course_captioner(preset, progress=False)
        config = info["config"]
        source = f"the {preset!r} preset's captioner"
    if not isinstance(captioner.encoder, SmallCNN):
        raise SystemExit("bench/errors.py reads the grid cells of a SmallCNN encoder; this captioner has another")
    size = config.captioner.image_size
    print(f"{source}, seed {config.seed}; {n_images} images per split (seed {EVAL_SEED}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")  # fmt: skip
    results: dict = {"source": source, "seed": config.seed, "images": n_images}

    scenes, predictions, features = {}, {}, {}
    for split in EVAL_SPLITS:
        world = S.ShapesWorld(split, size, EVAL_SEED, n_images)
        images = torch.stack([x for x, _ in ShapesCaptions(world)])  # (N, 3, S, S), as training fed them
        scenes[split] = [world.scene(i) for i in range(n_images)]
        predictions[split] = generate(captioner, images, tokenizer, config.max_length)
        with torch.no_grad():
            features[split] = captioner.encoder(images)

    results["by_count"] = {split: exact_by_count(predictions[split], scenes[split]) for split in EVAL_SPLITS}
    print("\n1. exact match by the number of objects (%; images in brackets)")
    print(f"{'split':<9}" + "".join(f"{str(k) + ' object' + 's' * (k > 1):>18}" for k in COUNTS))
    for split, row in results["by_count"].items():
        cells = (f"{100 * v['exact match']:.1f} ({v['images']})" for v in row.values())
        print(f"{split:<9}" + "".join(f"{cell:>18}" for cell in cells))

    results["kinds"] = {split: kinds_of_error(predictions[split], scenes[split], size) for split in EVAL_SPLITS}
    print("\n2. kinds of wrong caption (% of all captions), and objects named right")
    print(f"{'kind':<62}" + "".join(f"{split:>10}" for split in EVAL_SPLITS))
    for kind in results["kinds"][EVAL_SPLITS[0]]:
        print(f"{kind:<62}" + "".join(f"{100 * results['kinds'][s][kind]:>10.1f}" for s in EVAL_SPLITS))

    held = results["held_out"] = held_out_shapes(predictions["heldout"], scenes["heldout"])
    probe_world = S.ShapesWorld("train", size, 2, n_probe)  # other scenes than the captioner trained on
    with torch.no_grad():
        probe_features = captioner.encoder(torch.stack([x for x, _ in ShapesCaptions(probe_world)]))
    train_x, train_y = cell_rows(probe_features, [probe_world.scene(i) for i in range(n_probe)], captioner.encoder,
                                 lambda o: True)  # fmt: skip
    probe = {}
    torch.manual_seed(0)  # the probes' initial weights: the same numbers on every run
    for k in COUNTS:
        rows = [i for i, sc in enumerate(scenes["heldout"]) if len(sc.objects) == k]
        if rows:
            held_out = [scenes["heldout"][i] for i in rows]
            test_x, test_y = cell_rows(features["heldout"][rows], held_out, captioner.encoder,
                                       lambda o: (o.colour, o.shape) in S.HELD_OUT_PAIRS)  # fmt: skip
            probe[k] = linear_probe(train_x, train_y, test_x, test_y)
    held["probe"] = probe
    print("\n3. the held-out pair's object: its shape named right by the caption, and read by a linear probe of the "
          "encoder's cell under its centre (shape channels; trained on objects of training scenes) (%)")
    print(f"{'objects in the scene':<22}{'objects':>9}{'caption':>10}{'probe':>10}")
    for k, row in held["by_count"].items():
        print(f"{k:<22}{row['objects']:>9}{100 * row['shape right']:>10.1f}{100 * probe[k]:>10.1f}")
    print("shapes said for held-out objects named wrongly ('-': no object of that colour named):")
    for pair, said in held["wrong_shapes"].items():
        print(f"  {pair:<16} {', '.join(f'{s} {n}' for s, n in said.items()) or 'none'}")

    painted = results["painted"] = {}
    print("\n4. the same scenes with one object repainted, nothing else changed: that object's shape named right (%)")
    print(f"{'':<44}{'objects in the scene':>22}{'scenes':>8}{'before':>9}{'after':>9}")
    for name, (split, rows) in painted_pairs(scenes).items():
        painted[name] = {}
        for k in COUNTS:
            chosen = [(i, new, j) for i, new, j in rows if len(new.objects) == k]
            if not chosen:
                continue
            said = generate(captioner, images_of([new for _, new, _ in chosen], size), tokenizer, config.max_length)
            before = after = 0
            for p, (i, new, j) in zip(said, chosen):
                obj = scenes[split][i].objects[j]
                before += shape_said(predictions[split][i], obj.colour) == obj.shape  # section 1's caption
                after += shape_said(p, new.objects[j].colour) == obj.shape
            row = painted[name][k] = {"scenes": len(chosen), "before": before / len(chosen),
                                      "after": after / len(chosen)}  # fmt: skip
            print(f"{name:<44}{k:>22}{len(chosen):>8}{100 * row['before']:>9.1f}{100 * row['after']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
