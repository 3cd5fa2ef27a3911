"""Scoring generated captions: exact match and per-attribute accuracy, then BLEU, ROUGE-L and CIDEr.

What it teaches: two kinds of evaluation side by side. Because shapes-world captions follow a grammar,
`attribute_scores` reads each generated caption back with the world's parser (`shapes.try_parse`) and
says exactly *what* it got wrong: a colour, a shape, a size, how many objects, a relation. The n-gram
metrics captioning papers report (BLEU, Papineni et al., 2002; ROUGE-L, Lin, 2004; CIDEr, Vedantam et
al., 2015) only measure overlap with reference text; `caption_metrics` computes them with
`pycocoevalcap`, the reference implementation behind the COCO caption leaderboard, so our numbers
mean what the papers' numbers mean. On the shapes world one swapped colour costs a caption its exact
match but barely dents BLEU: the table from `metrics_table` shows both. `error_kinds` sorts the wrong
captions by *how* they are wrong; one kind matters for compositional generalisation: every colour and
every shape of the scene named, but paired wrongly ("a red square and a blue circle" for a red circle
and a blue square), a failure to *bind* attributes to objects.

One image, several true captions. "a red circle to the left of a blue square." and "a blue square to
the right of a red circle." describe the same picture. The world writes one of them, the canonical one
(`shapes.canonical`: the leftmost object first), but a model that names the objects in another order
and gets every relation right has not erred. `true_captions(scene)` lists every caption the world could
write for a scene's image in some order; pass those as the references (the world's caption first) to
score a model on what it can see.

Tokenisation: pycocoevalcap's PTBTokenizer needs Java, so we tokenise simply instead (`simple_tokenize`):
lowercase, punctuation replaced by spaces, tokens split on whitespace. For shapes-world captions this
drops only the final "." and the ", which is" comma, as the PTB tokenizer would. METEOR and SPICE also
need Java and are left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from minivlm.data import shapes as S

__all__ = [
    "ATTRIBUTES", "CAPTION_METRICS", "ERROR_KINDS", "true_captions", "simple_tokenize", "attribute_scores",
    "caption_metrics", "evaluate_captions", "error_kinds", "metrics_table",
]  # fmt: skip

ATTRIBUTES = ("exact match", "parsed", "count", "colour", "shape", "size", "relation")  # attribute_scores' keys
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")  # caption_metrics' keys
ERROR_KINDS = ("exact match", "count or grammar wrong", "a colour or shape wrong", "colours and shapes paired wrongly",
               "size, relation or order wrong")  # error_kinds' keys, in the order they are tried
OBJECT_FIELDS = ("size", "colour", "shape")  # the order of ParsedScene.objects' tuples

References = Sequence[str] | Sequence[Sequence[str]]  # one caption per image, or several


def true_captions(scene: S.Scene) -> list[str]:
    """Every caption the world could write for this scene's image, its own caption first.

    An order of the objects gives a caption when each neighbouring pair stands in one clear relation
    (the rule `sample_scene` draws layouts by); the reversed order always does, others sometimes.
    """
    captions = [S.caption(scene)]
    for told in S.orders(scene):
        if (text := S.caption(told)) not in captions:
            captions.append(text)
    return captions


def simple_tokenize(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: the text pycocoevalcap's scorers expect, without Java."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """`references` as one non-empty list of captions per prediction, or a ValueError saying what is wrong."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references are sequences of captions, not one string")
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one reference (or list of references) per prediction, and at least one prediction: "
                         f"got {len(predictions)} predictions and {len(references)} references")  # fmt: skip
    lists = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    if empty := [i for i, refs in enumerate(lists) if not refs]:
        raise ValueError(f"every prediction needs at least one reference; predictions {empty[:5]} have none")
    return lists


def _hits(prediction: S.ParsedScene | None, reference: S.ParsedScene) -> dict[str, int]:
    """How many of the reference's count, object attributes and relations the prediction states at the same place."""
    hits = dict.fromkeys(ATTRIBUTES[2:], 0)
    if prediction is None:
        return hits
    hits["count"] = int(len(prediction.objects) == len(reference.objects))
    for said, true in zip(prediction.objects, reference.objects):
        for field, a, b in zip(OBJECT_FIELDS, said, true):
            hits[field] += a == b
    hits["relation"] = sum(a == b for a, b in zip(prediction.relations, reference.relations))
    return hits


def attribute_scores(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Exact match, parse rate and per-attribute accuracy of generated captions, through the world's parser.

    Each prediction is stripped of surrounding whitespace, then scored against its image's references:
    - exact match: fraction of predictions equal to one of their references (also stripped).
    - parsed: fraction of predictions the caption grammar accepts (`shapes.try_parse`).
    - count: fraction of predictions that parse and name as many objects as the reference.
    - colour, shape, size: over all objects of all references, the fraction whose prediction parses
      and names, at the same position in caption order, an object of that colour (shape, size).
      Position i is compared with position i only; extra objects in a prediction cost nothing here
      (they cost count and exact match).
    - relation: over all relations of all references, the fraction the prediction states at the same
      position ("to the left of" between its objects 1 and 2, ...); NaN when no reference has one.
    An unparseable prediction scores 0 on every attribute. With several references for an image
    (`true_captions`), the prediction is scored against the one it agrees with most (ties: the first).
    References must be shapes-world captions; `parse_caption` says where one is not.
    """
    reference_lists = _reference_lists(predictions, references)
    exact = parsed = 0
    hits = dict.fromkeys(ATTRIBUTES[2:], 0)
    totals = dict.fromkeys(ATTRIBUTES[2:], 0)
    for prediction, refs in zip(predictions, reference_lists):
        prediction = prediction.strip()
        said = S.try_parse(prediction)
        exact += prediction in [r.strip() for r in refs]
        parsed += said is not None
        trues = [S.parse_caption(r.strip()) for r in refs]
        best, true = max(((_hits(said, t), t) for t in trues), key=lambda pair: sum(pair[0].values()))
        for key in hits:
            hits[key] += best[key]
        n_objects = len(true.objects)
        totals["count"] += 1
        for field in OBJECT_FIELDS:
            totals[field] += n_objects
        totals["relation"] += len(true.relations)
    n = len(predictions)
    scores = {"exact match": exact / n, "parsed": parsed / n}
    return scores | {key: hits[key] / totals[key] if totals[key] else math.nan for key in hits}


def caption_metrics(predictions: Sequence[str], references: References) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr from pycocoevalcap, on `simple_tokenize`d text, as fractions.

    BLEU is corpus-level (clipped n-gram counts summed over all images, brevity penalty against the
    closest reference length); ROUGE-L is the mean over images of an LCS F-score (beta = 1.2).
    pycocoevalcap's CIDEr is CIDEr-D (clipped counts, a length penalty) on a 0–10 scale; papers report
    it times 100, as `metrics_table` does. Its n-gram weights (IDF) come from the references of the
    set being scored: an n-gram found in every image's references weighs nothing, and on one image
    every n-gram does, so CIDEr is 0. Score many images (hundreds) at once, and compare CIDEr only
    between runs on the same references. CIDEr averages over an image's references, so a caption equal
    to one of two different references scores below the maximum.
    """
    reference_lists = _reference_lists(predictions, references)
    res = {i: [simple_tokenize(p)] for i, p in enumerate(predictions)}  # image id -> [one candidate]
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(reference_lists)}  # id -> references
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return dict(zip(CAPTION_METRICS, [float(b) for b in bleu] + [float(rouge), float(cider)]))


def evaluate_captions(predictions: Sequence[str], references: References) -> dict[str, float]:
    """Every number for one set of generations: `attribute_scores`, then `caption_metrics`."""
    return attribute_scores(predictions, references) | caption_metrics(predictions, references)


def error_kinds(predictions: Sequence[str], references: References) -> dict[str, float]:
    """The fraction of predictions of each of ERROR_KINDS: each caption counts once, in the first kind that fits.

    - exact match: equal to one of its references (stripped);
    - count or grammar wrong: does not parse, or names another number of objects;
    - a colour or shape wrong: the colours it names, or the shapes, are not the scene's (in any order);
    - colours and shapes paired wrongly: every colour and every shape right, but not on the same objects;
    - size, relation or order wrong: every colour–shape pair right; a size, a relation or the order is not
      (an order is wrong when the relations it states do not hold, or it is a true order told wrongly).
    The kinds add up to 1. A scene's objects have distinct colours and distinct shapes, so "the scene's colours"
    is a set; its references all name the same objects, and the first is used.
    """
    reference_lists = _reference_lists(predictions, references)
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for prediction, refs in zip(predictions, reference_lists):
        prediction = prediction.strip()
        said, true = S.try_parse(prediction), S.parse_caption(refs[0].strip())
        if prediction in [r.strip() for r in refs]:
            kind = "exact match"
        elif said is None or len(said.objects) != len(true.objects):
            kind = "count or grammar wrong"
        elif any({o[i] for o in said.objects} != {o[i] for o in true.objects} for i in (1, 2)):  # colours, shapes
            kind = "a colour or shape wrong"
        elif {o[1:] for o in said.objects} != {o[1:] for o in true.objects}:  # (colour, shape) pairs
            kind = "colours and shapes paired wrongly"
        else:
            kind = "size, relation or order wrong"
        counts[kind] += 1
    return {kind: n / len(predictions) for kind, n in counts.items()}


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table of {split: {metric: fraction}}: one column per split, values in % to 1 decimal.

    Metrics are rows, in the order they first appear; a metric a split lacks, or a NaN, shows as "–".
    CIDEr, a 0–10 score, also shows times 100, as papers report it.
    """
    if not results:
        raise ValueError("metrics_table needs at least one split, e.g. {'test': evaluate_captions(...)}")
    names = list(dict.fromkeys(name for scores in results.values() for name in scores))
    lines = ["| metric | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for name in names:
        values = [scores.get(name, math.nan) for scores in results.values()]
        lines.append(f"| {name} | " + " | ".join("–" if math.isnan(v) else f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)
