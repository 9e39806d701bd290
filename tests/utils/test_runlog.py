"""harmonic.utils.runlog: a run's log, plain while it trains and compressed once finished."""

import json

import pytest

from harmonic.utils.runlog import find_log, pack_log, read_log, unpack_log


def test_pack_and_unpack_round_trip(tmp_path):
    records = [{"iter": i, "loss": 1.0 / 2**i} for i in range(1, 4)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert find_log(tmp_path).name == "log.jsonl"
    packed = pack_log(tmp_path)
    assert packed.name == "log.jsonl.gz" and not (tmp_path / "log.jsonl").exists()
    assert find_log(tmp_path) == packed and read_log(tmp_path) == records == read_log(packed)
    assert pack_log(tmp_path) is None  # nothing plain left to pack
    unpack_log(tmp_path)
    assert find_log(tmp_path).name == "log.jsonl" and read_log(tmp_path) == records
    assert not (tmp_path / "log.jsonl.gz").exists()


def test_packing_keeps_float32_precision_and_drops_a_cut_last_line(tmp_path):
    records = [{"iter": 1, "loss": 0.12345678901234, "watch": {"p": [1.0000000123, 2.5e-12]}, "tag": "x"}]
    plain = tmp_path / "log.jsonl"
    plain.write_text(json.dumps(records[0]) + '\n{"iter": 2, "lo')
    packed = read_log(pack_log(tmp_path))
    assert packed == [{"iter": 1, "loss": 0.1234568, "watch": {"p": [1.0, 2.5e-12]}, "tag": "x"}]
    assert isinstance(packed[0]["iter"], int)


def test_a_cut_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"iter": 1}\n{"iter": 2, "lo')
    assert read_log(path) == [{"iter": 1}]
    path.write_text('{"iter": 1}\n{"iter"\n{"iter": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_log(path)
