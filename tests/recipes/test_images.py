"""Reading labelled images (folder per class, CSV/JSONL of paths, datasets name) and the errors for bad ones."""

import json

import numpy as np
import pytest
from PIL import Image

from pica.recipes.images import load_image_processor
from pica.recipes.tasks import get_task, image_classify
from tests.recipes.image_fixtures import picture, save_tiny_vision_model, write_folder, write_table


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images") / "train", 6)


def test_folder_csv_and_jsonl_give_the_same_images_and_labels(folder, tmp_path):
    from_folder = image_classify.load_examples(folder)
    csv_examples = image_classify.load_examples(write_table(tmp_path / "t.csv", folder))
    jsonl_examples = image_classify.load_examples(write_table(tmp_path / "t.jsonl", folder, ".jsonl"))
    key = lambda examples: sorted((e["path"].split("/")[-1], e["label"]) for e in examples)  # noqa: E731
    assert key(from_folder) == key(csv_examples) == key(jsonl_examples)
    assert {e["label"] for e in from_folder} == {"stripes", "dots"}
    assert csv_examples[0]["location"].endswith("t.csv:2") and csv_examples[0]["picture"] is None
    assert len(image_classify.load_examples(folder, limit=4)) == 4
    assert get_task("image-classify") is image_classify


def test_datasets_source_with_class_labels(monkeypatch):
    import datasets

    rows = datasets.Dataset.from_dict(
        {"img": [picture("stripes", 0), picture("dots", 1)], "label": [0, 1]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["stripes", "dots"])}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: rows)
    examples = image_classify.load_examples("toy/shapes@train")
    assert [e["label"] for e in examples] == ["stripes", "dots"]
    assert examples[1]["image"] == "toy/shapes@train[1]" and examples[1]["picture"].mode == "RGB"


def _bad_png(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


@pytest.mark.parametrize("case", ["unreadable", "missing", "alpha", "empty_label", "no_image_column", "non_integral"])
def test_bad_rows_name_the_file_and_row(tmp_path, case):
    picture("dots", 0).save(tmp_path / "ok.png")
    second, match = {"unreadable": ({"image": "bad.png", "label": "a"}, r"t.jsonl:2: cannot read image .*bad.png"),
                     "missing": ({"image": "gone.png", "label": "a"}, r"t.jsonl:2: image file not found: .*gone.png"),
                     "alpha": ({"image": "rgba.png", "label": "a"},
                               r"t.jsonl:2: image .*rgba.png has mode RGBA \(4 channel\(s\)\), which cannot be converted"),
                     "empty_label": ({"image": "ok.png", "label": " "}, r"t.jsonl:2: missing or empty label field"),
                     "no_image_column": ({"picture": "ok.png", "label": "a"}, r"t.jsonl:2: missing image field 'image'"),
                     "non_integral": ({"image": "ok.png", "label": 1.5}, r"t.jsonl:2: label field 'label' must be")}[case]
    _bad_png(tmp_path / "bad.png")
    picture("dots", 0, mode="RGBA").save(tmp_path / "rgba.png")
    rows = [{"image": "ok.png", "label": "a"}, second]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=match):
        image_classify.load_examples(tmp_path / "t.jsonl")


def test_unreadable_image_in_a_folder_names_the_file(tmp_path):
    root = write_folder(tmp_path / "train", 4)
    _bad_png(root / "dots" / "zz_broken.png")
    with pytest.raises(ValueError, match=r"cannot read image .*dots/zz_broken.png"):
        image_classify.load_examples(root)


def test_mixed_channels_refused_with_mode_null_and_converted_by_default(tmp_path):
    picture("dots", 0, mode="L").save(tmp_path / "grey.png")
    picture("dots", 1, mode="RGB").save(tmp_path / "colour.png")
    (tmp_path / "t.csv").write_text("image,label\ngrey.png,a\ncolour.png,b\n")
    with pytest.raises(ValueError, match=r"t.csv:3: image .*colour.png has mode RGB .* the first image .*grey.png "
                                         r"has mode L: mixed channels"):
        image_classify.load_examples(tmp_path / "t.csv", mode=None)
    assert all(e["label"] in ("a", "b") for e in image_classify.load_examples(tmp_path / "t.csv"))


def test_mixed_sizes_need_the_size_option(tmp_path):
    model = save_tiny_vision_model(tmp_path / "m")
    picture("dots", 0, size=12).save(tmp_path / "small.png")
    picture("dots", 1, size=20).save(tmp_path / "large.png")
    (tmp_path / "t.csv").write_text("image,label\nsmall.png,a\nlarge.png,b\n")
    examples = image_classify.load_examples(tmp_path / "t.csv")
    processor = image_classify.load_processor(str(model), {})
    processor.do_resize = False  # a processor that keeps each image's own size
    with pytest.raises(ValueError, match=r"t.csv:3: image .*large.png was processed to shape \(3, 20, 20\), but "
                                         r".*small.png to \(3, 12, 12\): the images have mixed sizes"):
        image_classify.build_train_dataset(examples, processor, labels=["a", "b"])
    resized = image_classify.load_processor(str(model), {"size": 8})
    dataset = image_classify.build_train_dataset(examples, resized, labels=["a", "b"])
    assert tuple(dataset[1]["pixel_values"].shape) == (3, 8, 8) and np.asarray(dataset["labels"]).tolist() == [0, 1]


def test_unknown_eval_label_names_the_file(folder, tmp_path):
    picture("dots", 0).save(tmp_path / "x.png")
    (tmp_path / "e.csv").write_text("image,label\nx.png,dots\nx.png,circles\n")
    options = image_classify.infer_options(image_classify.load_examples(folder), {})
    with pytest.raises(ValueError, match=r"e.csv:3: label 'circles' of image .*x.png is not among the training labels "
                                         r"\['dots', 'stripes'\]"):
        image_classify.check_eval_examples(image_classify.load_examples(tmp_path / "e.csv"), options)


@pytest.mark.parametrize(("options", "match"), [({"sizes": 8}, r"unknown task option\(s\) \['sizes'\]"),
                                                ({"size": 0}, "size must be a positive integer"),
                                                ({"mode": "CMYK"}, "mode must be one of"),
                                                ({"problem": "regression"}, "problem must be 'classification'"),
                                                ({"metric": "pearson"}, "metric must be one of")])
def test_bad_options_are_refused(folder, options, match):
    with pytest.raises(ValueError, match=match):
        image_classify.load_examples(folder, **options)


def test_processor_size_is_checked(tmp_path):
    model = save_tiny_vision_model(tmp_path / "m")
    processor = load_image_processor(str(model), 10)
    out = processor(images=[Image.fromarray(np.zeros((30, 7, 3), dtype=np.uint8))], return_tensors="np")
    assert out["pixel_values"].shape == (1, 3, 10, 10)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        load_image_processor(str(model), -3)
