"""Folders of real captioned images: from a COCO caption JSON or an `image,caption` CSV to (tensor, str) pairs.

What it teaches: the plumbing between a folder of photos and the tensors a model eats, and the ways it
breaks. Two layouts cover most public caption sets. COCO Captions (Chen et al., 2015, "Microsoft COCO
Captions: Data Collection and Evaluation Server") ships one JSON with an "images" list (id, file_name)
and an "annotations" list (image_id, caption), about five captions per image; it is read here with the
`json` module alone, no pycocotools. Flickr8k/Flickr30k (Hodosh et al., 2013; Young et al., 2014) are
commonly shared as a CSV with an `image,caption` header, one row per caption.

Item i is one (image, caption) pair, one per caption, as captioning models are trained (ClipCap, Mokady
et al., 2021, treats every caption as its own example); `captions_by_image` groups all the captions of
each image, as evaluation needs them (a generated caption is scored against every reference).

Folders are large, so nothing is opened at construction: the JSON or CSV is checked there, each image
only when it is asked for, and a missing or unreadable file is reported with the annotation or CSV line
that named it. Real files come in many colour modes; `load_rgb` turns every one into 3-channel RGB.

Axis letters: C channels, H height, W width, S the side of the square images the transform makes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_CROP_SCALE", "load_rgb", "image_transform", "CocoCaptions",
           "CsvCaptions"]  # fmt: skip

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel mean of ImageNet, in [0, 1]: what pretrained CNNs expect
IMAGENET_STD = (0.229, 0.224, 0.225)  # per-channel standard deviation of ImageNet
TRAIN_CROP_SCALE = (0.8, 1.0)  # a training crop keeps 80–100% of the image; less may cut out what a caption names
CSV_COLUMNS = ("image", "caption")  # the header a caption CSV must have (more columns are ignored)


def load_rgb(path: str | Path, source: str | None = None) -> Image.Image:
    """Read an image file of any colour mode as an RGB PIL image, with errors that name the file.

    Grayscale ("L"), palette ("P") and CMYK images are converted to RGB. Images with transparency
    (RGBA, LA, or a palette with a transparent colour) are composited onto a *white* background: simply
    dropping the alpha channel would show whatever colour the transparent pixels happen to store, often
    black, where a viewer shows the page behind them. `source` says what referenced the file (an
    annotation, a CSV line) and is added to the error messages.
    """
    path = Path(path)
    where = f" (referenced by {source})" if source else ""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found{where}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later inside a transform
    except (Image.UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image file {path}{where}: {err}") from err
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_transform(image_size: int, train: bool = False, normalize: bool = False) -> v2.Compose:
    """PIL image -> float32 tensor (3, S, S), S = image_size: the shorter side resized to S, then a square crop.

    Evaluation (train=False) crops the centre. Training crops a random 80–100% of the image
    (TRAIN_CROP_SCALE) at a random aspect ratio and resizes it to S × S, so the model sees many framings
    of one photo. There is deliberately no horizontal flip: captions say "left" and "right", and a
    flipped image would contradict its caption. Values are in [0, 1], like the shapes world's images;
    normalize=True subtracts the ImageNet mean and divides by its standard deviation, which a CNN
    pretrained on ImageNet (torchvision's weights) expects.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (pixels), got {image_size!r}")
    if train:
        resize = [v2.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, antialias=True)]
    else:
        resize = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]  # an int resizes the shorter side
    steps = [*resize, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]  # uint8 0..255 -> float 0..1
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose([*steps, v2.ToPureTensor()])  # a plain Tensor, not a torchvision `Image` subclass


class _CaptionedFolder(Dataset):
    """Rows of (image file, caption) under one folder; an image is read only when its row is asked for."""

    def __init__(self, images_dir: str | Path, rows: list[tuple[str, str, str]], transform: Callable | None):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"images folder {self.images_dir} does not exist")
        self.rows = rows  # (file name relative to images_dir, caption, what listed it: for error messages)
        self.transform = transform  # PIL image -> tensor, e.g. image_transform(S); None returns the PIL image
        self.captions_by_image: dict[str, list[str]] = {}  # file name -> all its captions, for evaluation
        for name, caption, _ in rows:
            self.captions_by_image.setdefault(name, []).append(caption)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Image.Image, str]:
        """Row i as (image, caption); the image is transformed, or an RGB PIL image if transform is None."""
        name, caption, source = self.rows[i]
        image = load_rgb(self.images_dir / name, source)
        return (image if self.transform is None else self.transform(image)), caption


def _read_json(path: Path) -> object:
    """The parsed contents of a JSON file, or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _entries(data: object, key: str, fields: tuple[str, ...], path: Path) -> list[dict]:
    """data[key] as a list of dicts that each have `fields`, or a ValueError naming what is missing."""
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} has no {key!r} list; a COCO captions file has 'images' and 'annotations' lists")
    for k, entry in enumerate(entries):
        missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise ValueError(f"{path}: {key}[{k}] has no {missing[0]!r} (expected the keys {', '.join(fields)})")
    return entries


class CocoCaptions(_CaptionedFolder):
    """A COCO-style caption set: images in `images_dir`, their captions in a COCO JSON file.

    Item i is the i-th annotation: (image, caption). Captions are stripped of surrounding whitespace
    (COCO's have stray spaces and newlines). Images that no annotation mentions are left out.
    """

    def __init__(self, images_dir: str | Path, annotations_json: str | Path, transform: Callable | None = None):
        path = Path(annotations_json)
        data = _read_json(path)
        images = _entries(data, "images", ("id", "file_name"), path)
        annotations = _entries(data, "annotations", ("image_id", "caption"), path)
        file_names: dict[object, str] = {}  # image id -> file name
        for image in images:
            if image["id"] in file_names:
                raise ValueError(f"{path}: image id {image['id']!r} appears twice in 'images'")
            file_names[image["id"]] = image["file_name"]
        rows = []
        for k, ann in enumerate(annotations):
            if ann["image_id"] not in file_names:
                raise ValueError(f"{path}: annotations[{k}] refers to image_id {ann['image_id']!r}, "
                                 f"which is not in the 'images' list")  # fmt: skip
            source = f"{path.name} annotations[{k}], image_id {ann['image_id']!r}"
            rows.append((file_names[ann["image_id"]], str(ann["caption"]).strip(), source))
        super().__init__(images_dir, rows, transform)


class CsvCaptions(_CaptionedFolder):
    """A CSV of captions with an `image,caption` header, one row per caption (Flickr style).

    Image paths are relative to `images_dir`, by default the CSV's own folder. Captions may be quoted
    to hold commas (`"a dog, a cat and a ball"`), as the `csv` module writes them.
    """

    def __init__(self, csv_path: str | Path, images_dir: str | Path | None = None, transform: Callable | None = None):
        path = Path(csv_path)
        if not path.is_file():
            raise FileNotFoundError(f"captions file {path} not found")
        with path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: skip the byte-order mark Excel writes
            reader = csv.reader(f)
            header = [column.strip() for column in next(reader, [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path} must have a header row with the columns {', '.join(CSV_COLUMNS)}; "
                                 f"found the columns {header} (missing {', '.join(missing)})")  # fmt: skip
            image_at, caption_at = (header.index(c) for c in CSV_COLUMNS)
            rows = []
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise ValueError(f"{path} line {reader.line_num} has {len(row)} fields, the header has "
                                     f"{len(header)}; quote captions that contain commas")  # fmt: skip
                rows.append((row[image_at], row[caption_at].strip(), f"{path.name} line {reader.line_num}"))
        super().__init__(path.parent if images_dir is None else images_dir, rows, transform)
