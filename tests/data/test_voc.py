import json

import pytest
from PIL import Image

from harmonic.cli import main as cli_main
from harmonic.data import CocoDetection
from harmonic.data.voc import VOC_CLASSES, VocError, parse_voc_xml, read_image_set, voc_to_coco


def _xml(filename="000001.jpg", size=(500, 375), objects=(), extra=""):
    objs = ""
    for name, box, difficult in objects:
        coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        objs += (
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"
        )
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>{size_xml}{extra}{objs}</annotation>"


@pytest.fixture
def voc(tmp_path):
    """A VOC year folder with three annotated images and a trainval image set of two of them."""
    ann = tmp_path / "VOC2007" / "Annotations"
    ann.mkdir(parents=True)
    (ann / "000005.xml").write_text(
        _xml("000005.jpg", (500, 375), [("chair", (263, 211, 324, 339), 0), ("chair", (5, 244, 67, 374), 1)])
    )
    (ann / "000001.xml").write_text(_xml("000001.jpg", (353, 500), [("dog", (48, 240, 195, 371), 0), ("person", (8, 12, 352, 498), 0)]))
    (ann / "000007.xml").write_text(_xml("000007.jpg", (500, 333), [("car", (141, 50, 500, 330), 0)]))
    sets = tmp_path / "VOC2007" / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "trainval.txt").write_text("000005\n000007\n\n")
    return tmp_path / "VOC2007"


def test_conversion_values(voc, tmp_path):
    out = tmp_path / "coco.json"
    coco = voc_to_coco(voc / "Annotations", out)
    assert json.loads(out.read_text()) == coco
    # images in sorted XML order, ids 1..N
    assert [(i["id"], i["file_name"], i["width"], i["height"], i["voc_id"]) for i in coco["images"]] == [
        (1, "000001.jpg", 353, 500, "000001"),
        (2, "000005.jpg", 500, 375, "000005"),
        (3, "000007.jpg", 500, 333, "000007"),
    ]
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    dog = coco["annotations"][0]
    # VOC (48, 240, 195, 371), 1-based inclusive -> x = 47, y = 239, w = 195 - 48 + 1 = 148, h = 132
    assert dog["bbox"] == [47.0, 239.0, 148.0, 132.0]
    assert dog["area"] == 148.0 * 132.0
    assert dog["category_id"] == VOC_CLASSES.index("dog") + 1 == 12
    assert (dog["image_id"], dog["iscrowd"], dog["difficult"]) == (1, 0, 0)
    assert coco["annotations"][1]["bbox"] == [7.0, 11.0, 345.0, 487.0]
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3, 4, 5]


def test_difficult_objects_become_ignore_regions_or_are_kept_or_dropped(voc):
    by_mode = {mode: voc_to_coco(voc / "Annotations", difficult=mode)["annotations"] for mode in ("crowd", "keep", "drop")}
    difficult = [a for a in by_mode["crowd"] if a["difficult"]]
    assert len(difficult) == 1 and difficult[0]["iscrowd"] == 1 and difficult[0]["bbox"] == [4.0, 243.0, 63.0, 131.0]
    assert sum(a["iscrowd"] for a in by_mode["crowd"]) == 1
    assert sum(a["iscrowd"] for a in by_mode["keep"]) == 0 and len(by_mode["keep"]) == 5
    assert len(by_mode["drop"]) == 4 and not any(a["difficult"] for a in by_mode["drop"])
    with pytest.raises(ValueError, match="difficult must be one of"):
        voc_to_coco(voc / "Annotations", difficult="maybe")


def test_image_set_selects_files_in_its_order(voc):
    coco = voc_to_coco(voc / "Annotations", image_set=voc / "ImageSets" / "Main" / "trainval.txt")
    assert [i["voc_id"] for i in coco["images"]] == ["000005", "000007"]
    assert [a["image_id"] for a in coco["annotations"]] == [1, 1, 2]
    (voc / "ImageSets" / "Main" / "bad.txt").write_text("000005\n000099\n")
    with pytest.raises(VocError, match=r"bad\.txt: image id '000099' has no annotation file .*000099\.xml"):
        voc_to_coco(voc / "Annotations", image_set=voc / "ImageSets" / "Main" / "bad.txt")
    (voc / "ImageSets" / "Main" / "cat_val.txt").write_text("000001 -1\n000007  1\n")
    assert read_image_set(voc / "ImageSets" / "Main" / "cat_val.txt") == ["000001", "000007"]


def test_list_of_files_and_inferred_classes(voc):
    files = [voc / "Annotations" / "000007.xml", voc / "Annotations" / "000001.xml"]
    coco = voc_to_coco(files, class_names=None)
    assert [c["name"] for c in coco["categories"]] == ["car", "dog", "person"]
    assert [i["voc_id"] for i in coco["images"]] == ["000007", "000001"]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2, 3]
    coco = voc_to_coco(files, class_names=["person", "dog", "car"])
    assert [a["category_id"] for a in coco["annotations"]] == [3, 2, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotation><filename>a.jpg</filename><size>", r"bad\.xml: malformed XML \(.*line 1"),
        (_xml(size=None), r"bad\.xml: missing <size>"),
        (_xml(size=(0, 10)), r"bad\.xml: <size> must hold positive integers"),
        (_xml(objects=[("dog", ("", 1, 2, 3), 0)]), r"bad\.xml: missing <bndbox/xmin> in object 0 \(dog\)"),
        (_xml(objects=[("dog", ("a", 1, 2, 3), 0)]), r"bad\.xml: <bndbox/xmin> in object 0 \(dog\) is not a number"),
        (_xml(objects=[("dog", (1, 1, 2, 3), 0), ("dog", (9, 1, 2, 3), 0)]), r"bad\.xml: inverted box in object 1 \(dog\)"),
        (_xml(objects=[("dog", (1, 1, 2, 3), 2)]), r"bad\.xml: <difficult> in object 0 \(dog\) must be 0 or 1"),
        (_xml(objects=[("unicorn", (1, 1, 2, 3), 0)]), r"bad\.xml: object 0 has unknown class 'unicorn'"),
        ("<root/>", r"bad\.xml: root element is <root>"),
    ],
)
def test_errors_name_the_xml_file(tmp_path, text, message):
    (tmp_path / "bad.xml").write_text(text)
    out = tmp_path / "out.json"
    with pytest.raises(VocError, match=message):
        voc_to_coco([tmp_path / "bad.xml"], out)
    assert not out.exists()  # nothing half-written


def test_missing_filename_defaults_to_the_xml_stem(tmp_path):
    (tmp_path / "2008_000123.xml").write_text(_xml(filename="", objects=[("cat", (1, 1, 10, 10), 0)]))
    record = parse_voc_xml(tmp_path / "2008_000123.xml")
    assert record["filename"] == "2008_000123.jpg"
    assert record["objects"] == [{"name": "cat", "bbox": (1.0, 1.0, 10.0, 10.0), "difficult": False, "truncated": False}]


def test_converted_file_loads_in_cocodetection(tmp_path):
    (tmp_path / "a.xml").write_text(_xml("a.png", (20, 10), [("dog", (1, 1, 20, 10), 0), ("cat", (3, 2, 5, 4), 1)]))
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    voc_to_coco([tmp_path / "a.xml"], tmp_path / "coco.json")
    ds = CocoDetection(tmp_path, tmp_path / "coco.json")
    image, target = ds[0]
    assert image.shape == (3, 10, 20)
    # the whole image, 1-based (1, 1)..(20, 10) inclusive, is exactly the XYXY box (0, 0, 20, 10)
    assert target["boxes"].tolist() == [[0, 0, 20, 10]]
    assert [ds.class_names[label - 1] for label in target["labels"].tolist()] == ["dog"]
    assert target["crowd_boxes"].tolist() == [[2, 1, 5, 4]]  # the difficult cat, as an ignore region


def test_cli_voc2coco(voc, tmp_path, capsys):
    out = tmp_path / "trainval.json"
    assert cli_main(["voc2coco", "--voc-root", str(voc), "--split", "trainval", "--out", str(out)]) == 0
    assert "2 images, 3 annotations (1 difficult as ignore regions)" in capsys.readouterr().out
    assert [i["voc_id"] for i in json.loads(out.read_text())["images"]] == ["000005", "000007"]
    out2 = tmp_path / "all.json"
    args = ["voc2coco", "--ann-dir", str(voc / "Annotations"), "--out", str(out2), "--classes", "auto", "--difficult", "drop"]
    assert cli_main(args) == 0
    assert [c["name"] for c in json.loads(out2.read_text())["categories"]] == ["car", "chair", "dog", "person"]
    assert cli_main(["voc2coco", "--ann-dir", str(voc / "Annotations"), "--out", str(out2), "--classes", "dog"]) == 1
    assert "unknown class" in capsys.readouterr().err
    assert cli_main(["voc2coco", "--voc-root", str(voc), "--out", str(out2)]) == 2
