"""harmonic.utils.files: result files that never end half-written, plain or gzip-compressed."""

import gzip
import json

import pytest

from harmonic.utils.files import atomic_write_json, read_json


def test_json_round_trips_plain_and_compressed(tmp_path):
    obj = {"b": [1, 2.5, None], "a": "x"}
    plain = atomic_write_json(tmp_path / "r.json", obj)
    packed = atomic_write_json(tmp_path / "r.json.gz", obj)
    assert read_json(plain) == obj and read_json(packed) == obj
    assert plain.read_text().startswith('{\n  "a"')  # sorted keys, indented
    assert json.loads(gzip.decompress(packed.read_bytes())) == obj
    again = atomic_write_json(tmp_path / "again.json.gz", obj)
    assert again.read_bytes() == packed.read_bytes()  # no timestamp in the gzip header: reproducible bytes


def test_nan_is_refused_and_the_old_file_kept(tmp_path):
    path = atomic_write_json(tmp_path / "r.json.gz", {"x": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")})
    assert read_json(path) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json.gz"]


def test_exclusive_lock_makes_its_folder_and_lock_file_beside_the_path(tmp_path):
    from harmonic.utils.files import exclusive_lock

    target = tmp_path / "cache" / "backbone.pt"
    with exclusive_lock(target):
        assert (tmp_path / "cache" / ".backbone.pt.lock").is_file()
        with exclusive_lock(tmp_path / "other"):  # a lock on another path does not wait for this one
            pass
