import json
import re

import pytest
from PIL import Image

from harmonic.cli import main as cli_main
from harmonic.data import CocoDetection
from harmonic.data.voc import (
    VOC_CLASSES,
    UnknownClassError,
    VocError,
    class_names_from_coco,
    merge_coco,
    parse_voc_xml,
    read_image_set,
    voc_to_coco,
)


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


def test_output_carries_the_voc_marker(voc):
    info = voc_to_coco(voc / "Annotations")["info"]
    assert info["source_format"] == "pascal_voc" and info["difficult"] == "crowd" and info["file_name_fixes"] == 0
    assert info["description"] == "converted from PASCAL VOC XML by harmonic.data.voc"


# ----------------------------------------------------------------------------------------------------
# messy exports
# ----------------------------------------------------------------------------------------------------
def test_filename_extension_is_fixed_to_the_shipped_image(voc, tmp_path, capsys):
    images = voc / "JPEGImages"
    images.mkdir()
    for stem in ("000001", "000005", "000007"):
        Image.new("RGB", (4, 4)).save(images / f"{stem}.jpg")
    # the export says .png where a .jpg is shipped, and one <filename> has no extension at all
    (voc / "Annotations" / "000005.xml").write_text(_xml("000005.png", (500, 375), [("chair", (263, 211, 324, 339), 0)]))
    (voc / "Annotations" / "000007.xml").write_text(_xml("000007", (500, 333), [("car", (141, 50, 500, 330), 0)]))
    coco = voc_to_coco(voc / "Annotations", image_dir=images, file_prefix="VOC2007/JPEGImages/")
    assert [i["file_name"] for i in coco["images"]] == [f"VOC2007/JPEGImages/{s}.jpg" for s in ("000001", "000005", "000007")]
    assert coco["info"]["file_name_fixes"] == 2
    # the command uses JPEGImages/ of --voc-root and prints the count
    out = tmp_path / "tv.json"
    assert cli_main(["voc2coco", "--voc-root", str(voc), "--split", "trainval", "--out", str(out)]) == 0
    assert "2 <filename>(s) fixed to the image shipped with the same stem" in capsys.readouterr().out
    assert [i["file_name"] for i in json.loads(out.read_text())["images"]] == ["000005.jpg", "000007.jpg"]
    # no file with that stem, or several: an error naming the XML file
    (images / "000007.jpg").unlink()
    with pytest.raises(VocError, match=r"000007\.xml: <filename> '000007': no such image in .*JPEGImages"):
        voc_to_coco(voc / "Annotations", image_dir=images)
    for ext in ("jpg", "jpeg"):
        Image.new("RGB", (4, 4)).save(images / f"000007.{ext}")
    with pytest.raises(VocError, match=r"000007\.xml: .*several files there share its stem: \['000007\.jpeg', '000007\.jpg'\]"):
        voc_to_coco(voc / "Annotations", image_dir=images)


def test_splits_converted_separately_share_category_ids(voc, tmp_path, capsys):
    sets = voc / "ImageSets" / "Main"
    (sets / "test.txt").write_text("000001\n")  # dog, person: not the trainval classes (car, chair)
    (sets / "all.txt").write_text("000001\n000005\n000007\n")
    every = tmp_path / "all.json"
    assert cli_main(["voc2coco", "--voc-root", str(voc), "--split", "all", "--out", str(every), "--classes", "auto"]) == 0
    test = tmp_path / "test.json"
    assert cli_main(["voc2coco", "--voc-root", str(voc), "--split", "test", "--out", str(test),
                     "--classes-from", str(every)]) == 0
    cats = {c["name"]: c["id"] for c in json.loads(every.read_text())["categories"]}
    assert cats == {"car": 1, "chair": 2, "dog": 3, "person": 4}
    assert json.loads(test.read_text())["categories"] == json.loads(every.read_text())["categories"]
    assert [a["category_id"] for a in json.loads(test.read_text())["annotations"]] == [3, 4]
    # --classes auto on test alone would have numbered dog 1: the reason for --classes-from
    alone = voc_to_coco(voc / "Annotations", image_set=sets / "test.txt", class_names=None)
    assert [a["category_id"] for a in alone["annotations"]] == [1, 2]
    # a class the earlier conversion lacks is an error that names the flag
    trainval = tmp_path / "trainval.json"
    assert cli_main(["voc2coco", "--voc-root", str(voc), "--split", "trainval", "--out", str(trainval), "--classes", "auto"]) == 0
    capsys.readouterr()
    assert cli_main(["voc2coco", "--voc-root", str(voc), "--split", "test", "--out", str(test),
                     "--classes-from", str(trainval)]) == 1
    err = capsys.readouterr().err
    assert "000001.xml: object 0 has unknown class 'dog'" in err and f"--classes-from {trainval}" in err
    assert "class_names" not in err
    with pytest.raises(UnknownClassError):
        voc_to_coco(voc / "Annotations", class_names=class_names_from_coco(trainval))


def test_class_list_and_merge_errors(voc, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}))
    with pytest.raises(VocError, match=r"bad\.json: category ids must be 1\.\.2, got \[1, 3\]"):
        class_names_from_coco(bad)
    with pytest.raises(VocError, match="class list file not found"):
        class_names_from_coco(tmp_path / "none.json")
    a = voc_to_coco([voc / "Annotations" / "000001.xml", voc / "Annotations" / "000005.xml"])
    b = voc_to_coco([voc / "Annotations" / "000007.xml"])
    merged = merge_coco([a, b])
    assert [i["id"] for i in merged["images"]] == [1, 2, 3] and [i["voc_id"] for i in merged["images"]][-1] == "000007"
    assert [x["id"] for x in merged["annotations"]] == [1, 2, 3, 4, 5]
    assert merged["annotations"][-1]["image_id"] == 3 and merged["info"]["source_format"] == "pascal_voc"
    with pytest.raises(VocError, match="part 1 has other categories"):
        merge_coco([a, voc_to_coco([voc / "Annotations" / "000007.xml"], class_names=None)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--voc-root", "{root}/nowhere", "--split", "trainval"], "--voc-root {root}/nowhere: no Annotations/ folder"),
        (["--voc-root", "{voc}", "--split", "val"], r"--split val: no image set .*val\.txt \(image sets there: \['trainval'\]\)"),
        (["--voc-root", "{voc}"], "--voc-root needs --split"),
        (["--voc-root", "{voc}", "--split", "trainval", "--image-set", "x.txt"], "--image-set goes with --ann-dir"),
        (["--ann-dir", "{root}/nowhere"], "--ann-dir {root}/nowhere: no such folder"),
        (["--ann-dir", "{voc}/Annotations", "--split", "trainval"], "--split goes with --voc-root"),
        (["--ann-dir", "{voc}/Annotations", "--image-set", "{root}/x.txt"], "--image-set {root}/x.txt: no such file"),
        (["--ann-dir", "{voc}/Annotations", "--image-dir", "{root}/nowhere"], "--image-dir {root}/nowhere: no such folder"),
        (["--ann-dir", "{voc}/Annotations", "--classes", "dog,cat,dog"], r"--classes 'dog,cat,dog': duplicate names \['dog'\]"),
        (["--ann-dir", "{voc}/Annotations", "--classes-from", "{root}/x.json"], "--classes-from: class list file not found"),
        ([], "give --voc-root with --split, or --ann-dir"),
    ],
)
def test_cli_errors_name_the_flags(voc, tmp_path, capsys, args, message):
    root = str(tmp_path)
    args = [a.format(root=root, voc=voc) for a in args]
    assert cli_main(["voc2coco", *args, "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert re.search(message.format(root=re.escape(root)), err), err
    for python_name in ("class_names", "image_set=", "voc_root", "ann_dir"):
        assert python_name not in err
    assert not (tmp_path / "o.json").exists()
