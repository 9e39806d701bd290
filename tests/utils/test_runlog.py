"""harmonic.utils.runlog: a run's log, plain while it trains and compressed once finished."""

import json

import pytest

from harmonic.utils.runlog import find_log, pack_log, read_log, tail_means, unpack_log


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


def test_packing_keeps_every_float32_value_and_drops_a_cut_last_line(tmp_path):
    import numpy as np

    values = np.random.default_rng(0).standard_normal(2000).astype(np.float32) * 10.0 ** np.arange(-20, 20, 0.02)
    values = [float(v) for v in values.astype(np.float32)] + [16777216.0, float(np.nextafter(np.float32(1), 2))]
    records = [{"iter": 1, "loss": 0.12345678901234, "watch": {"p": values}, "tag": "x"}]
    plain = tmp_path / "log.jsonl"
    plain.write_text(json.dumps(records[0]) + '\n{"iter": 2, "lo')
    packed = read_log(pack_log(tmp_path))
    assert len(packed) == 1 and isinstance(packed[0]["iter"], int) and packed[0]["tag"] == "x"
    # each float32 value comes back as the same float32
    assert np.array_equal(np.array(packed[0]["watch"]["p"], dtype=np.float32), np.array(values, dtype=np.float32))
    assert packed[0]["watch"]["p"][-2] == 16777216.0
    assert packed[0]["loss"] == 0.123456789  # a float64 keeps 9 significant digits


def test_a_cut_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"iter": 1}\n{"iter": 2, "lo')
    assert read_log(path) == [{"iter": 1}]
    path.write_text('{"iter": 1}\n{"iter"\n{"iter": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_log(path)


def test_tail_means_average_the_last_share_of_the_records_that_carry_each_key():
    records = [{"a": float(i), "b": None if i < 18 else 1.0} for i in range(20)] + [{"c": 3}]
    means = tail_means(records, ["a", "b", "c", "d"], 0.1)
    assert means["a"] == 18.5  # the last 2 of 20 values
    assert means["b"] == 1.0  # 2 records carry it: its last one (at least one record)
    assert means["c"] == 3.0 and means["d"] is None
    with pytest.raises(ValueError, match="tail"):
        tail_means(records, ["a"], 0.0)
