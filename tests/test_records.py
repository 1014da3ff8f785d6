"""Quality records and the A/B log: every field round-trips, the split is stable, nothing logged is lost.

The sink contract tests run for every sink: JSONL, SQLite and a real PostgreSQL server (the
``postgres_url`` fixture). Writers in other processes run ``python -c CHILD``, which imports
``grefine_hooks.records`` only (the package's top level is lazy: no torch).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from grefine_hooks import records
from grefine_hooks.records import SCHEMA_VERSION, QualityLog, QualityRecord, assign_arm

SUFFIXES = ["jsonl", "sqlite"]
SINKS = [*SUFFIXES, "postgresql"]

CHILD = """
import sys
from grefine_hooks import records
log_path, run_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdin.readline()  # the parent's go: start together with the other writers
with records.QualityLog(log_path) as log:
    for index in range(count):
        record = records.QualityRecord(
            run_id=run_id, pipeline_class="ChildPipeline", image_index=index, arm="treatment",
            decision="refined", reason="child", prompt="a red cube on a table " * 8,
            p_before=0.25, a_before=0.5, p_after=0.5, a_after=0.75, timings={"score": 0.1},
        )
        log.write(record)
        sys.stdout.write(record.record_id + "\\n")
        sys.stdout.flush()
"""


def make_record(**overrides) -> QualityRecord:
    values = dict(run_id="run-a", pipeline_class="TinyPipeline", image_index=0, arm="control",
                  decision="skipped", reason="control arm")
    values.update(overrides)
    return QualityRecord(**values)


def full_record() -> QualityRecord:
    """A record with a non-default value in every field (the test below checks that it stays so)."""
    return QualityRecord(
        run_id="run-42",
        record_id="0123456789abcdef0123456789abcdef",
        created_at="2026-01-02T03:04:05.678901+00:00",
        schema_version=SCHEMA_VERSION,
        pipeline_class="StableDiffusionXLPipeline",
        model_id="org/tiny-sdxl",
        prompt='a "red" cube\non a table, \u2603 \u2028 caf\u00e9',
        negative_prompt="blurry, lowres",
        seed=2**63 + 5,  # torch seeds reach 2**64 - 1, beyond SQLite's integers
        image_index=3,
        arm="treatment",
        p_before=0.125,
        a_before=0.375,
        decision="reverted",
        reason="p 0.12 < 0.50",
        stage1_strength=0.55,
        stage1_steps=12,
        stage2_strength=0.15,
        stage2_steps=4,
        p_after=0.1,
        a_after=0.3,
        guard="reverted: p 0.12 -> 0.10",
        timings={"generate": 3.5, "score": 0.25, "stage1": 2.0, "stage2": 1.0, "rescore": 0.25, "total": 7.0},
        error="stage 2 raised RuntimeError: CUDA out of memory",
        image_path="out/run-42/3.png",
        original_image_path="out/run-42/3_original.png",
        map_paths={"P": "out/run-42/3_P.png", "A": "out/run-42/3_A.png"},
        maps={"P_mean": 0.4, "A_mean": 0.2, "mask_share": 0.3},
        phrases=[{"noun": "cube", "text": "red cube", "ancestor": None, "ancestor_index": None,
                  "a_noun": 0.6, "a_phrase": 0.4, "defect": "adjective unmatched"}],
        emphasized_prompt="a (red cube:1.2) on a table",
        policy={"p_threshold": 0.5, "a_threshold": 0.5, "refine_steps": None, "guard": True},
        request_id="req-7f3a",
        replica="host-a:4242",
    )


@pytest.fixture
def start_writer():
    """Starts writer processes waiting for ``go`` (unbuffered stdout: the parent reads exactly what
    they printed); any still running when the test ends, e.g. after a failure, is killed."""
    children: list[subprocess.Popen] = []

    def start(path: Path | str, run_id: str, count: int) -> subprocess.Popen:
        command = [sys.executable, "-c", CHILD, str(path), run_id, str(count)]
        children.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0))
        return children[-1]

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if not stream.closed:
                stream.close()


@pytest.fixture(params=SINKS)
def sink(request) -> str:
    return request.param


@pytest.fixture
def location(sink, tmp_path, request) -> Path | str:
    """A new log of the sink: a file in tmp_path, or an empty database on the test server."""
    if sink == "postgresql":
        return request.getfixturevalue("postgres_url")
    return tmp_path / f"quality.{sink}"


def go(child: subprocess.Popen) -> None:
    child.stdin.write(b"go\n")
    child.stdin.close()


def check_jsonl_lines(path: Path) -> None:
    """Every newline-terminated line is one whole record: no interleaving, no torn line but the last."""
    for line in path.read_bytes().split(b"\n")[:-1]:
        QualityRecord.from_json(line)


# --- QualityRecord --------------------------------------------------------------------------------


def test_full_record_sets_every_field():
    record = full_record()
    for item in fields(QualityRecord):
        if item.name == "schema_version":  # only one version exists yet
            continue
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        assert getattr(record, item.name) != default, item.name


def test_record_round_trips_through_dict_and_json():
    record = full_record()
    assert QualityRecord.from_dict(record.to_dict()) == record
    line = record.to_json()
    assert "\n" not in line
    assert QualityRecord.from_json(line) == record


def test_defaults_are_fresh_and_well_formed():
    first, second = make_record(), make_record()
    assert first.record_id != second.record_id and len(first.record_id) == 32
    created = datetime.fromisoformat(first.created_at)
    assert created.utcoffset() == timedelta(0) and "." in first.created_at
    assert first.schema_version == SCHEMA_VERSION == 2
    assert first.request_id is None and first.replica is None


def test_version_1_records_read_back_without_the_service_fields(location):
    """A log written before request_id/replica existed stays readable, in every sink."""
    values = make_record().to_dict()
    del values["request_id"], values["replica"]
    values["schema_version"] = 1
    old = QualityRecord.from_dict(values)
    assert old.schema_version == 1 and old.request_id is None and old.replica is None
    with QualityLog(location) as log:
        log.write(old)
        assert log.read() == [old]


def test_added_seconds_sums_only_the_refiners_timings():
    record = full_record()  # generate and total are not the refiner's
    assert record.added_seconds == pytest.approx(0.25 + 2.0 + 1.0 + 0.25)
    assert make_record(timings={"generate": 2.0}).added_seconds == 0.0


def test_numpy_numbers_are_stored_as_plain_numbers():
    record = make_record(p_before=np.float32(0.25), seed=np.int64(7), arm="treatment", decision="skipped")
    assert type(record.p_before) is float and type(record.seed) is int
    assert json.loads(record.to_json())["p_before"] == 0.25


@pytest.mark.parametrize(
    "field, value",
    [
        ("arm", "placebo"),
        ("decision", "maybe"),
        ("p_before", 1.5),
        ("a_before", -0.1),
        ("p_after", float("nan")),
        ("a_after", "0.5"),
        ("stage1_strength", 2.0),
        ("stage1_steps", -1),
        ("image_index", 1.0),
        ("seed", True),
        ("run_id", ""),
        ("run_id", "run\x00a"),  # a SQL log could never store it: refused when built, not at every retry
        ("record_id", "id\x00"),
        ("created_at", "2026-01-02T03:04:05"),  # naive
        ("created_at", "2026-01-02T03:04:05Z"),  # no microseconds
        ("created_at", "2026-01-02T04:04:05.000000+01:00"),  # not UTC
        ("schema_version", 0),
        ("timings", {"stage1": -1.0}),
        ("maps", {"size": [64, 64]}),
        ("map_paths", ["P.png"]),
        ("map_paths", {"P": 3}),
        ("phrases", [{"noun": object()}]),
        ("policy", "p_threshold=0.5"),
        ("prompt", 42),
    ],
)
def test_invalid_fields_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        make_record(**{"arm": "treatment", "decision": "refined", field: value})


@pytest.mark.parametrize("decision", ["refined", "reverted"])
def test_control_arm_is_never_refined(decision):
    with pytest.raises(ValueError, match="control arm"):
        make_record(arm="control", decision=decision)


def test_newer_schema_version_is_a_clear_error():
    values = full_record().to_dict()
    values.update(schema_version=SCHEMA_VERSION + 1, field_from_the_future=1)
    with pytest.raises(ValueError, match="newer grefine-hooks"):
        QualityRecord.from_dict(values)


def test_from_dict_names_unknown_and_missing_fields():
    values = make_record().to_dict()
    with pytest.raises(ValueError, match="colour"):
        QualityRecord.from_dict({**values, "colour": "red"})
    del values["reason"]
    with pytest.raises(ValueError, match="reason"):
        QualityRecord.from_dict(values)


# --- assign_arm -----------------------------------------------------------------------------------


def test_assignment_is_pinned():
    """SHA-256, not Python's salted hash: these hold in every process and every release."""
    arms = [assign_arm("run-1", "a red cube", 0, index, 0.5) for index in range(8)]
    assert arms == ['treatment', 'control', 'control', 'treatment', 'control', 'control', 'treatment', 'control']


@pytest.mark.parametrize("split", [0.1, 0.3, 0.5, 0.9])
def test_split_proportion_on_10000_keys(split):
    """Binomial sd at 10,000 keys is <= 0.005: 0.02 is a 4-sigma tolerance."""
    arms = [assign_arm(f"run-{key % 7}", f"prompt {key // 7}", key % 3, key % 4, split) for key in range(10_000)]
    assert abs(arms.count("treatment") / 10_000 - split) < 0.02


@pytest.mark.parametrize("split, arm", [(0.0, "control"), (1.0, "treatment")])
def test_edge_splits_are_absolute(split, arm):
    assert {assign_arm("run", f"prompt {key}", key, key % 4, split) for key in range(10_000)} == {arm}


def test_every_key_part_changes_the_draw():
    base = dict(run_id="run", prompt="a cube", seed=1, image_index=0)
    for name, values in [("run_id", [f"run-{i}" for i in range(64)]), ("prompt", [f"p{i}" for i in range(64)]),
                         ("seed", list(range(64))), ("image_index", list(range(64)))]:
        arms = {assign_arm(**{**base, name: value}, ab_split=0.5) for value in values}
        assert arms == {"control", "treatment"}, name
    assert assign_arm(**base, ab_split=0.5) == assign_arm(**base, ab_split=0.5)


def _fix_digest(monkeypatch, byte: bytes) -> None:
    """Every sha256 digest ``assign_arm`` draws from becomes 32 copies of ``byte``."""

    class FixedDigest:
        def digest(self) -> bytes:
            return byte * 32

    monkeypatch.setattr(records.hashlib, "sha256", lambda data: FixedDigest())


def test_the_largest_draw_still_goes_to_treatment_at_split_one(monkeypatch):
    """The draw keeps 53 bits: with 64 it would round up to 1.0 and miss ``draw < 1.0``."""
    _fix_digest(monkeypatch, b"\xff")
    assert assign_arm("run", "prompt", 0, 0, 1.0) == "treatment"
    assert assign_arm("run", "prompt", 0, 0, 0.999999) == "control"


@pytest.mark.parametrize("split", [-0.1, 1.01, float("nan"), True, "0.5"])
def test_invalid_split_is_rejected(split):
    with pytest.raises(ValueError, match="ab_split"):
        assign_arm("run", "prompt", 0, 0, split)


# --- QualityLog: formats, round trip, schema ------------------------------------------------------


def test_every_field_round_trips_through_the_log(location, sink):
    path = location
    record = full_record()
    with QualityLog(path) as log:
        log.write(record)
    with QualityLog(path) as log:  # a fresh open reads what the first wrote
        (read_back,) = log.read()
    assert read_back.to_dict() == record.to_dict()


@pytest.mark.parametrize(
    "name, sink, expected",
    [("q.jsonl", None, "jsonl"), ("q.JSONL", None, "jsonl"), ("q.sqlite", None, "sqlite"),
     ("q.sqlite3", None, "sqlite"), ("q.db", None, "sqlite"), ("q.log", "jsonl", "jsonl"), ("q", "sqlite", "sqlite")],
)
def test_sink_from_suffix_or_argument(tmp_path, name, sink, expected):
    with QualityLog(tmp_path / name, sink=sink) as log:
        assert log.sink == expected
        log.write(make_record())
        assert len(log.read()) == 1


def test_unknown_suffix_or_sink_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"\.jsonl.*\.sqlite"):
        QualityLog(tmp_path / "quality.csv")
    with pytest.raises(ValueError, match="jsonl"):
        QualityLog(tmp_path / "quality.jsonl", sink="csv")
    assert list(tmp_path.iterdir()) == []


def test_reopening_keeps_what_was_logged(location, sink):
    path = location
    with QualityLog(path) as log:
        log.write_many([make_record(image_index=0), make_record(image_index=1)])
    with QualityLog(path) as log:
        log.write(make_record(image_index=2))
        assert [record.image_index for record in log.read()] == [0, 1, 2]


def test_newer_schema_in_sqlite_meta_is_refused_on_open(tmp_path):
    path = tmp_path / "quality.sqlite"
    with QualityLog(path) as log:
        log.write(make_record())
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    connection.close()
    with pytest.raises(ValueError, match="newer grefine-hooks") as error:
        QualityLog(path)
    assert str(path) in str(error.value)


def test_newer_schema_line_in_jsonl_is_refused_on_read(tmp_path):
    path = tmp_path / "quality.jsonl"
    with QualityLog(path) as log:
        log.write(make_record())
        future = {**make_record().to_dict(), "schema_version": SCHEMA_VERSION + 1, "new_field": [1]}
        with open(path, "a") as file:
            file.write(json.dumps(future) + "\n")
        with pytest.raises(ValueError, match=r"line 2.*newer grefine-hooks"):
            log.read()


def test_read_filters(location, sink):
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    stamps = [(start + timedelta(minutes=minute)).isoformat(timespec="microseconds") for minute in range(4)]
    with QualityLog(location) as log:
        log.write_many([
            make_record(run_id="a", created_at=stamps[0]),
            make_record(run_id="a", created_at=stamps[1], arm="treatment", decision="refined"),
            make_record(run_id="b", created_at=stamps[2]),
            make_record(run_id="b", created_at=stamps[3], arm="treatment", decision="failed"),
        ])
        assert [r.created_at for r in log.read(run_id="b")] == stamps[2:]
        assert [r.created_at for r in log.read(arm="treatment")] == [stamps[1], stamps[3]]
        # [since, until): consecutive windows never count a record twice.
        assert [r.created_at for r in log.read(since=stamps[1], until=start + timedelta(minutes=3))] == stamps[1:3]
        eastern = timezone(timedelta(hours=-5))
        assert len(log.read(since=(start + timedelta(minutes=2)).astimezone(eastern))) == 2
        with pytest.raises(ValueError, match="since"):
            log.read(since=datetime(2026, 1, 1))  # naive: which zone?
        with pytest.raises(ValueError, match="arm"):
            log.read(arm="placebo")


# --- QualityLog: summary --------------------------------------------------------------------------


def summary_records() -> list[QualityRecord]:
    def treat(**values):
        return make_record(arm="treatment", reason="test", **values)

    return [
        make_record(p_before=0.5, a_before=0.25, timings={"generate": 3.0, "score": 0.5}),
        make_record(p_before=0.75, a_before=0.75, timings={"generate": 3.0, "score": 0.25}),
        treat(decision="skipped", p_before=0.75, a_before=0.75, timings={"generate": 3.0, "score": 0.5}),
        treat(decision="refined", p_before=0.25, a_before=0.5, p_after=0.5, a_after=0.75,
              timings={"score": 0.5, "stage1": 2.0, "stage2": 1.0, "rescore": 0.5, "total": 7.0}),
        treat(decision="refined", p_before=0.5, a_before=0.25, p_after=0.25, a_after=0.5,  # equal sum
              timings={"score": 0.5, "stage1": 2.0, "rescore": 0.5}),
        treat(decision="reverted", p_before=0.25, a_before=0.25, p_after=0.125, a_after=0.25,
              timings={"score": 0.5, "stage1": 1.5, "stage2": 0.5, "rescore": 0.5}),
        treat(decision="failed", p_before=0.25, a_before=0.25, timings={"score": 0.5, "stage1": 0.25},
              error="stage 1 raised RuntimeError"),
        treat(decision="refined", p_before=0.5, a_before=0.5, timings={"score": 0.5, "stage1": 1.0, "stage2": 0.5}),
        treat(run_id="run-b", decision="refined", p_before=0.0, a_before=0.0, p_after=1.0, a_after=1.0),
    ]


def test_summary_by_hand(location, sink):
    with QualityLog(location) as log:
        log.write_many(summary_records())
        summary = log.summary(run_id="run-a")
        assert log.summary()["treatment"]["count"] == 7  # run-b counts without the filter
    assert summary["control"] == {
        "count": 2,
        "decisions": {"skipped": 2, "refined": 0, "reverted": 0, "failed": 0},
        "p_before_mean": pytest.approx((0.5 + 0.75) / 2),
        "a_before_mean": pytest.approx((0.25 + 0.75) / 2),
        "p_after_mean": None,
        "a_after_mean": None,
        "p_final_mean": pytest.approx(0.625),
        "a_final_mean": pytest.approx(0.5),
        "refine_rate": 0.0,
        "added_seconds_mean": pytest.approx((0.5 + 0.25) / 2),
        "improved_share": None,
    }
    assert summary["treatment"] == {
        "count": 6,
        "decisions": {"skipped": 1, "refined": 3, "reverted": 1, "failed": 1},
        "p_before_mean": pytest.approx((0.75 + 0.25 + 0.5 + 0.25 + 0.25 + 0.5) / 6),
        "a_before_mean": pytest.approx((0.75 + 0.5 + 0.25 + 0.25 + 0.25 + 0.5) / 6),
        "p_after_mean": pytest.approx((0.5 + 0.25 + 0.125) / 3),  # the reverted one's too
        "a_after_mean": pytest.approx((0.75 + 0.5 + 0.25) / 3),
        # What the caller got: after for refined, before otherwise; the unscored refined one is out.
        "p_final_mean": pytest.approx((0.75 + 0.5 + 0.25 + 0.25 + 0.25) / 5),
        "a_final_mean": pytest.approx((0.75 + 0.75 + 0.5 + 0.25 + 0.25) / 5),
        "refine_rate": pytest.approx(5 / 6),
        "added_seconds_mean": pytest.approx((0.5 + 4.0 + 3.0 + 3.0 + 0.75 + 2.0) / 6),
        # Refined with all four scores: one improved, one only equal (strictly greater counts).
        "improved_share": pytest.approx(1 / 2),
    }


def test_summary_of_an_empty_log_has_both_arms(tmp_path):
    with QualityLog(tmp_path / "quality.jsonl") as log:
        summary = log.summary()
    assert set(summary) == {"control", "treatment"}
    assert summary["treatment"]["count"] == 0 and summary["treatment"]["refine_rate"] is None


# --- QualityLog: torn and corrupt lines (JSONL) ---------------------------------------------------


def test_torn_last_line_is_skipped_counted_then_isolated(tmp_path):
    path = tmp_path / "quality.jsonl"
    with QualityLog(path) as log:
        log.write_many([make_record(image_index=index) for index in range(3)])
        line = make_record(image_index=3).to_json().encode()
        with open(path, "ab") as file:
            file.write(line[: len(line) // 2])  # a writer killed mid-write
        assert [record.image_index for record in log.read()] == [0, 1, 2]
        assert log.skipped_lines == 1
        log.write(make_record(image_index=4))  # starts on a fresh line: the fragment swallows nothing
        assert [record.image_index for record in log.read()] == [0, 1, 2, 4]
        assert log.skipped_lines == 1
    assert path.read_bytes().split(b"\n")[3] == line[: len(line) // 2]


def test_corrupt_middle_line_is_skipped_counted_and_warned(tmp_path, caplog):
    path = tmp_path / "quality.jsonl"
    good = [make_record(image_index=index).to_json() for index in range(2)]
    path.write_text(f"{good[0]}\n{{\"run_id\": \"trunc\x00\n{good[1]}\n", encoding="utf-8")
    with QualityLog(path) as log, caplog.at_level(logging.WARNING, logger=records.__name__):
        assert [record.image_index for record in log.read()] == [0, 1]
        assert log.skipped_lines == 1
    assert "numbers [2]" in caplog.text


def test_valid_json_that_is_not_a_record_raises_with_its_line(tmp_path):
    path = tmp_path / "quality.jsonl"
    path.write_text(make_record().to_json() + '\n{"run_id": "x"}\n' + make_record().to_json() + "\n")
    with QualityLog(path) as log, pytest.raises(ValueError, match="line 2.*missing"):
        log.read()


def test_complete_record_missing_only_its_newline_is_read(tmp_path):
    path = tmp_path / "quality.jsonl"
    path.write_text(make_record(image_index=0).to_json() + "\n" + make_record(image_index=1).to_json())
    with QualityLog(path) as log:
        assert [record.image_index for record in log.read()] == [0, 1]
        assert log.skipped_lines == 0


# --- QualityLog: bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_directory_names_the_path(tmp_path, suffix):
    path = tmp_path / "missing" / f"quality.{suffix}"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        QualityLog(path)
    assert str(path) in str(error.value)
    assert not path.parent.exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_path_under_a_regular_file_names_the_path(tmp_path, suffix):
    """Fails for root too, unlike a read-only directory."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    path = blocker / f"quality.{suffix}"
    with pytest.raises(NotADirectoryError) as error:
        QualityLog(path)
    assert str(path) in str(error.value)
    assert blocker.read_text() == "keep me"


@contextlib.contextmanager
def _unwritable(directory: Path):
    """Mode 0555, and for root (CI) the immutable attribute too: root ignores the mode bits."""
    directory.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(directory)], check=True, capture_output=True)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True, capture_output=True)
        directory.chmod(0o755)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_only_directory_names_the_path(tmp_path, suffix):
    directory = tmp_path / "read-only"
    directory.mkdir()
    path = directory / f"quality.{suffix}"
    with _unwritable(directory):
        assert not os.access(directory, os.W_OK)
        with pytest.raises(PermissionError) as error:
            QualityLog(path)
    assert str(path) in str(error.value)
    assert list(directory.iterdir()) == []


def test_corrupted_sqlite_file_is_refused_untouched(tmp_path):
    path = tmp_path / "quality.sqlite"
    garbage = random.Random(0).randbytes(8192)
    path.write_bytes(garbage)
    with pytest.raises(ValueError, match="not a SQLite database") as error:
        QualityLog(path)
    assert str(path) in str(error.value)
    assert path.read_bytes() == garbage


def test_foreign_sqlite_database_is_refused_untouched(tmp_path):
    path = tmp_path / "app.db"
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("CREATE TABLE users (name TEXT)")
        connection.execute("INSERT INTO users VALUES ('ada')")
    connection.close()
    with pytest.raises(ValueError, match="not a grefine-hooks quality log"):
        QualityLog(path)
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
    connection.close()


def test_a_record_edited_into_nonsense_is_not_written(location, sink):
    record = make_record(arm="treatment", decision="refined")
    record.p_after = 1.5
    with QualityLog(location) as log:
        with pytest.raises(ValueError, match="p_after"):
            log.write_many([make_record(), record])  # all or nothing
        with pytest.raises(TypeError, match="QualityRecord"):
            log.write(record.to_dict())
        assert log.read() == []


def test_closed_log_refuses_io(location, sink):
    log = QualityLog(location)
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write(make_record())
    with pytest.raises(ValueError, match="closed"):
        log.read()


def test_sqlite_retried_write_is_idempotent_and_a_clashing_record_id_refused(tmp_path):
    record, other = make_record(), make_record(image_index=1)
    with QualityLog(tmp_path / "quality.sqlite") as log:
        log.write(record)
        # A retry of a write whose commit landed (the caller saw an error): stored once, the rest added.
        log.write_many([record, other])
        assert log.read() == [record, other]
        clash = make_record(image_index=2, record_id=record.record_id)
        with pytest.raises(ValueError, match="already logged with different content"):
            log.write_many([make_record(image_index=3), clash])  # all or nothing
        assert log.read() == [record, other]


def test_coerce(tmp_path):
    assert QualityLog.coerce(None) is None
    with QualityLog(tmp_path / "a.jsonl") as log:
        assert QualityLog.coerce(log) is log
    for value in (str(tmp_path / "b.sqlite"), tmp_path / "c.jsonl"):
        with QualityLog.coerce(value) as log:
            assert isinstance(log, QualityLog) and log.path == Path(value)
    with pytest.raises(TypeError, match="quality_log"):
        QualityLog.coerce(42)


# --- QualityLog: durability and concurrency -------------------------------------------------------


def test_every_acknowledged_record_survives_sigkill(location, sink, start_writer):
    path = location
    child = start_writer(path, "killed", 1000)
    # A one-page pipe keeps the child at most ~120 ids ahead of the parent, so the kill lands midway.
    fcntl.fcntl(child.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    go(child)
    printed = [child.stdout.readline().decode().strip() for _ in range(300)]
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    printed += child.stdout.read().decode().split()  # ids printed before the kill, still in the pipe
    assert child.returncode == -signal.SIGKILL
    assert 300 <= len(printed) < 1000 and all(len(record_id) == 32 for record_id in printed)

    with QualityLog(path) as log:
        logged = [record.record_id for record in log.read()]
        assert log.skipped_lines <= 1  # at most the line being written when the kill came
        assert set(printed) <= set(logged)
        assert len(logged) - len(printed) in (0, 1)  # written, killed before printing
        assert len(set(logged)) == len(logged)
        log.write(make_record())  # the log takes writes after the crash
        assert len(log.read()) == len(logged) + 1
    if sink == "jsonl":
        check_jsonl_lines(path)
    elif sink == "sqlite":
        connection = sqlite3.connect(path)
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        connection.close()


def test_eight_threads_share_one_log(location, sink):
    path = location
    barrier = threading.Barrier(8)

    def write(thread: int) -> list[str]:
        barrier.wait()
        ids = []
        for index in range(125):
            record = make_record(run_id=f"thread-{thread}", image_index=index)
            log.write(record)
            ids.append(record.record_id)
        return ids

    with QualityLog(path) as log, ThreadPoolExecutor(8) as pool:
        written = [record_id for ids in pool.map(write, range(8)) for record_id in ids]
    with QualityLog(path) as log:
        logged = log.read()
        assert log.skipped_lines == 0
    assert len(logged) == 1000 and {record.record_id for record in logged} == set(written)
    for thread in range(8):  # each thread's records in its own write order
        assert [r.image_index for r in logged if r.run_id == f"thread-{thread}"] == list(range(125))
    if sink == "jsonl":
        check_jsonl_lines(path)
        assert path.read_bytes().count(b"\n") == 1000


def test_four_processes_share_one_path_and_stay_readable(location, sink, start_writer):
    path = location
    children = [start_writer(path, f"process-{number}", 250) for number in range(4)]
    for child in children:
        go(child)
    # Read while they write (its own log, its own process): never a torn line, never fewer records.
    counts, deadline = [], time.monotonic() + 45
    with QualityLog(path) as reader:
        while any(child.poll() is None for child in children):
            assert time.monotonic() < deadline, "writers still running after 45 s"
            counts.append(len(reader.read()))
            assert reader.skipped_lines == 0
    printed = []
    for child in children:
        printed += child.stdout.read().decode().split()
        assert child.wait(timeout=30) == 0
    assert counts == sorted(counts)
    with QualityLog(path) as log:
        logged = log.read()
        assert log.skipped_lines == 0
    assert len(logged) == 1000 and len({record.record_id for record in logged}) == 1000
    assert {record.record_id for record in logged} == set(printed)
    for number in range(4):
        assert [r.image_index for r in logged if r.run_id == f"process-{number}"] == list(range(250))
    if sink == "jsonl":
        check_jsonl_lines(path)
        assert path.read_bytes().count(b"\n") == 1000


def test_the_smallest_draw_still_goes_to_control_at_split_zero(monkeypatch):
    """A draw of exactly 0.0 must not reach treatment when ab_split is 0: the test is ``draw < split``."""
    _fix_digest(monkeypatch, b"\x00")
    assert assign_arm("run", "prompt", 0, 0, 0.0) == "control"
    assert assign_arm("run", "prompt", 0, 0, 1e-12) == "treatment"


def test_prompt_and_seed_may_be_none():
    """Unconditional generation and unseeded calls still get a stable arm of their own."""
    arms = {assign_arm("run", None, None, index, 0.5) for index in range(64)}
    assert arms == {"control", "treatment"}
    assert assign_arm("run", None, None, 3, 0.5) == assign_arm("run", None, None, 3, 0.5)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("run", "p", 0, 0, 2.0), "ab_split must be in [0, 1], got 2.0"),
        ((7, "p", 0, 0, 0.5), "run_id must be a string, got 7"),
        (("run", 3, 0, 0, 0.5), "prompt must be a string or None, got 3"),
        (("run", "p", 1.5, 0, 0.5), "seed must be an integer, got 1.5"),
        (("run", "p", 0, "0", 0.5), "image_index must be an integer, got '0'"),
    ],
)
def test_assign_arm_errors_name_the_argument(arguments, message):
    with pytest.raises(ValueError) as error:
        assign_arm(*arguments)
    assert str(error.value) == message
