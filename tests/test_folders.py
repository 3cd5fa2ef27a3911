"""minivlm.data.folders pairs each caption with its own image, reads every colour mode as RGB, and names bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader

from minivlm.data.folders import IMAGENET_MEAN, IMAGENET_STD, CocoCaptions, CsvCaptions, image_transform, load_rgb

S = 16  # side of the transformed images
RED, GREY, GREEN, BLUE, WHITE = (200, 30, 30), (128, 128, 128), (0, 200, 0), (40, 80, 220), (255, 255, 255)
JPEG_TOL = dict(atol=3 / 255, rtol=0)  # JPEG may move a solid colour by a level or two


def solid(colour, size=(24, 20)):
    """A (3, 1, 1) tensor of an RGB colour in [0, 1], to compare with every pixel of an image."""
    return torch.tensor(colour, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, size[1], size[0])


def palette_image(size=(24, 20)):
    """A palette ("P") image: left half colour 0, declared transparent, right half colour 1, green."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    image.paste(1, (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.fixture
def folder(tmp_path):
    """A folder of three images, each one solid colour and a different file format and mode."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (30, 20), RED).save(images / "red.png")  # not square
    Image.new("L", (20, 30), 128).save(images / "grey.jpg")
    palette_image((20, 20)).crop((10, 0, 20, 20)).save(images / "green.png")  # palette, no transparency
    return images


def write_coco(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.fixture
def coco(folder, tmp_path):
    names = {7: "red.png", 3: "grey.jpg", 5: "green.png"}
    images = [{"id": i, "file_name": name} for i, name in names.items()]
    annotations = [  # interleaved, so pairing by position would fail
        {"image_id": 3, "caption": "a grey square. "},
        {"image_id": 7, "caption": "a red square."},
        {"image_id": 5, "caption": "a green square."},
        {"image_id": 3, "caption": "grey all over.\n"},
        {"image_id": 7, "caption": "red all over."},
    ]
    return CocoCaptions(folder, write_coco(tmp_path / "captions.json", images, annotations), image_transform(S))


EXPECTED = {"a grey square.": GREY, "grey all over.": GREY, "a red square.": RED, "red all over.": RED,
            "a green square.": GREEN}  # fmt: skip


def test_coco_pairs_each_caption_with_its_image(coco):
    assert len(coco) == 5
    for i in range(len(coco)):
        image, caption = coco[i]
        assert image.shape == (3, S, S) and image.dtype == torch.float32
        assert_close(image, solid(EXPECTED[caption], (S, S)), **JPEG_TOL)
    assert coco.captions_by_image == {"grey.jpg": ["a grey square.", "grey all over."],
                                      "red.png": ["a red square.", "red all over."],
                                      "green.png": ["a green square."]}  # fmt: skip


def test_csv_pairs_each_caption_with_its_image_and_keeps_quoted_commas(folder, tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text('image,caption\nimages/green.png,"green, and only green."\nimages/red.png,a red square.\n')
    data = CsvCaptions(path, transform=image_transform(S))  # images relative to the CSV's folder
    assert len(data) == 2
    assert data[0][1] == "green, and only green."
    assert_close(data[0][0], solid(GREEN, (S, S)))
    assert_close(data[1][0], solid(RED, (S, S)))
    same = CsvCaptions(path, images_dir=tmp_path, transform=image_transform(S))
    assert [c for _, c in same] == ["green, and only green.", "a red square."]


def test_without_a_transform_items_are_rgb_pil_images(coco):
    coco.transform = None
    image, caption = coco[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (20, 30)


def test_a_dataloader_batches_images_and_captions(coco):
    images, captions = next(iter(DataLoader(coco, batch_size=2)))
    assert images.shape == (2, 3, S, S) and type(images) is torch.Tensor
    assert list(captions) == ["a grey square.", "a red square."]


def test_non_square_images_are_resized_then_centre_cropped(tmp_path):
    """A 90 × 30 red | green | blue strip: the shorter side becomes S, and the centre crop is the green third."""
    strip = Image.new("RGB", (90, 30), RED)
    strip.paste(GREEN, (30, 0, 60, 30))
    strip.paste(BLUE, (60, 0, 90, 30))
    out = image_transform(S)(strip)
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert_close(out[:, :, 1:-1], solid(GREEN, (S - 2, S)), atol=1 / 255, rtol=0)  # edge columns may blend a little


def test_training_crops_vary_but_never_flip(tmp_path):
    """Captions say "left" and "right": the red left half must stay on the left in every random crop."""
    halves = Image.new("RGB", (32, 32), RED)
    halves.paste(BLUE, (16, 0, 32, 32))
    crops = torch.stack([image_transform(S, train=True)(halves) for _ in range(20)])  # (N, 3, S, S)
    assert crops.shape == (20, 3, S, S)
    assert (crops[:, 0, :, 0] > crops[:, 2, :, 0]).all()  # left column: more red than blue
    assert (crops[:, 2, :, -1] > crops[:, 0, :, -1]).all()  # right column: more blue than red
    assert not all(torch.equal(crops[0], crop) for crop in crops[1:])  # the crops differ


def test_normalize_uses_imagenet_statistics():
    out = image_transform(S, normalize=True)(Image.new("RGB", (20, 20), WHITE))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert_close(out[:, 0, 0], expected)


@pytest.mark.parametrize(
    "mode, colour, expected",
    [("L", 128, GREY), ("CMYK", (0, 255, 255, 0), (255, 0, 0)), ("RGBA", (*BLUE, 255), BLUE),
     ("RGBA", (0, 0, 0, 0), WHITE), ("LA", (0, 0), WHITE)],
)  # fmt: skip
def test_every_colour_mode_becomes_rgb(tmp_path, mode, colour, expected):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (6, 4), colour).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels == expected).all(), f"{mode} {colour} read as {pixels[0, 0]}, expected {expected}"


def test_transparency_is_composited_onto_white(tmp_path):
    """Half-transparent black over white is mid-grey; a palette's transparent colour is white."""
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(tmp_path / "half.png")
    assert abs(int(np.asarray(load_rgb(tmp_path / "half.png"))[0, 0, 0]) - 127) <= 1
    palette_image().save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_rgb(tmp_path / "p.png"))
    assert (pixels[:, :12] == WHITE).all() and (pixels[:, 12:] == GREEN).all()


def test_a_missing_image_names_the_file_and_the_line_that_listed_it(folder, tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text("image,caption\nimages/red.png,red.\nimages/gone.png,gone.\n")
    data = CsvCaptions(path)  # construction opens no image
    with pytest.raises(FileNotFoundError, match=r"gone\.png.*captions\.csv line 3"):
        data[1]


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_an_unreadable_image_raises_a_value_error_naming_the_file(folder, tmp_path, damage):
    if damage == "random bytes":
        (folder / "x.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    else:
        Image.effect_noise((64, 64), 60).convert("RGB").save(tmp_path / "whole.jpg")
        (folder / "x.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:800])
    data = CocoCaptions(folder, write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "x.jpg"}],
                                           [{"image_id": 1, "caption": "noise."}]))  # fmt: skip
    with pytest.raises(ValueError, match=r"x\.jpg.*c\.json annotations\[0\]"):
        data[0]


def test_bad_annotation_files_are_rejected_with_the_problem_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        CocoCaptions(folder, tmp_path / "nowhere.json")
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        CocoCaptions(folder, tmp_path / "broken.json")
    (tmp_path / "half.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"half\.json has no 'annotations' list"):
        CocoCaptions(folder, tmp_path / "half.json")
    path = write_coco(tmp_path / "c.json", [{"id": 1}], [])
    with pytest.raises(ValueError, match=r"images\[0\] has no 'file_name'"):
        CocoCaptions(folder, path)
    path = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "red.png"}], [{"image_id": 99, "caption": "?"}])
    with pytest.raises(ValueError, match=r"annotations\[0\] refers to image_id 99"):
        CocoCaptions(folder, path)
    path = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "red.png"}], [])
    with pytest.raises(FileNotFoundError, match="images folder .*nothing"):
        CocoCaptions(tmp_path / "nothing", path)


def test_bad_csv_files_are_rejected_with_the_problem_named(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text("file,text\na.png,a.\n")
    with pytest.raises(ValueError, match=r"found the columns \['file', 'text'\]"):
        CsvCaptions(path)
    path.write_text("image,caption\na.png,a dog, a cat.\n")
    with pytest.raises(ValueError, match=r"line 2 has 3 fields.*quote captions"):
        CsvCaptions(path)


def test_image_transform_rejects_a_bad_size():
    with pytest.raises(ValueError, match="positive int.*0"):
        image_transform(0)
