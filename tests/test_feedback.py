"""User feedback on logged images: append-only, several per record, unknown records refused, in every sink."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from grefine_hooks.records import FEEDBACK_SCHEMA_VERSION, Feedback, QualityLog, QualityRecord, feedback_score


def make_record(index: int = 0) -> QualityRecord:
    return QualityRecord(run_id="run", pipeline_class="P", image_index=index, arm="control", decision="skipped",
                         reason="test")


@pytest.fixture(params=["jsonl", "sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return tmp_path / f"quality.{request.param}"


def test_feedback_round_trips_several_per_record_append_only(location):
    first, second = make_record(0), make_record(1)
    with QualityLog(location) as log:
        log.write_many([first, second])
        up = log.add_feedback(first.record_id, "up", source="app", comment='looks "great"\nreally')
        rating = log.add_feedback(first.record_id, 0.25)
        down = log.add_feedback(second.record_id, False, source="moderator")
    with QualityLog(location) as log:  # a fresh open reads what the first wrote, in write order
        assert log.feedback() == [up, rating, down]
        assert log.feedback([second.record_id]) == [down]
        assert log.feedback(["no-such-record"]) == []
    assert (up.score, rating.score, down.score) == (1.0, 0.25, 0.0)
    assert up.source == "app" and rating.source == "user" and up.comment == 'looks "great"\nreally'
    assert len({up.feedback_id, rating.feedback_id, down.feedback_id}) == 3


def test_unknown_record_id_is_an_error_naming_it_and_writes_nothing(location):
    with QualityLog(location) as log:
        log.write(make_record())
        with pytest.raises(KeyError, match="no-such-id"):
            log.add_feedback("no-such-id", 1.0)
        assert log.feedback() == []


@pytest.mark.parametrize("score", [1.5, -0.1, float("nan"), "sideways", None, [1]])
def test_bad_score_is_named(location, score):
    with QualityLog(location) as log:
        record = make_record()
        log.write(record)
        with pytest.raises(ValueError, match="score"):
            log.add_feedback(record.record_id, score)
        assert log.feedback() == []


@pytest.mark.parametrize("field, value", [("source", ""), ("comment", 3), ("record_id", "")])
def test_bad_fields_are_named(field, value):
    values = {"record_id": "abc", "score": 0.5, field: value}
    with pytest.raises(ValueError, match=field):
        Feedback(**values)


def test_scores_from_thumbs_and_numbers():
    assert [feedback_score(value) for value in ("up", "DOWN", True, False, 0.5, "0.75", 1)] == [
        1.0, 0.0, 1.0, 0.0, 0.5, 0.75, 1.0
    ]


def test_eight_threads_add_feedback_at_once(location):
    record = make_record()
    with QualityLog(location) as log:
        log.write(record)
        barrier = threading.Barrier(8)

        def rate(thread: int) -> None:
            barrier.wait()
            for index in range(10):
                log.add_feedback(record.record_id, (thread * 10 + index) / 100)

        threads = [threading.Thread(target=rate, args=(thread,)) for thread in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(item.score for item in log.feedback()) == [value / 100 for value in range(80)]


def test_jsonl_feedback_lives_beside_the_log_created_on_first_use(tmp_path):
    path = tmp_path / "quality.jsonl"
    record = make_record()
    with QualityLog(path) as log:
        log.write(record)
        assert log.feedback() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["quality.jsonl"]
        log.add_feedback(record.record_id, "up")
    line = (tmp_path / "quality.feedback.jsonl").read_text().splitlines()
    assert len(line) == 1 and json.loads(line[0])["schema_version"] == FEEDBACK_SCHEMA_VERSION
    assert QualityRecord.from_json(path.read_text())  # the records file holds records only


def test_newer_feedback_schema_is_refused(tmp_path):
    sqlite_path = tmp_path / "quality.sqlite"
    with QualityLog(sqlite_path) as log:
        log.write(make_record())
    connection = sqlite3.connect(sqlite_path)
    with connection:
        connection.execute("UPDATE meta SET value = ? WHERE key = 'feedback_schema_version'",
                           (str(FEEDBACK_SCHEMA_VERSION + 1),))
    connection.close()
    with pytest.raises(ValueError, match="feedback schema_version .* newer grefine-hooks"):
        QualityLog(sqlite_path)

    jsonl_path = tmp_path / "quality.jsonl"
    record = make_record()
    with QualityLog(jsonl_path) as log:
        log.write(record)
        future = {**Feedback(record_id=record.record_id, score=1.0).to_dict(),
                  "schema_version": FEEDBACK_SCHEMA_VERSION + 1, "emoji": "+1"}
        (tmp_path / "quality.feedback.jsonl").write_text(json.dumps(future) + "\n")
        with pytest.raises(ValueError, match="line 1.*newer grefine-hooks"):
            log.feedback()


def test_a_sqlite_log_from_before_feedback_opens_unchanged_and_takes_feedback(tmp_path):
    """The layout version 2 logs had (meta, records, indexes; no feedback table), as sqlite3 wrote it."""
    path = tmp_path / "old.sqlite"
    record = make_record()
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        connection.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        connection.execute(
            "CREATE TABLE records (seq INTEGER PRIMARY KEY, record_id TEXT NOT NULL UNIQUE, run_id TEXT NOT NULL,"
            " arm TEXT NOT NULL, created_at TEXT NOT NULL, decision TEXT NOT NULL, schema_version INTEGER NOT NULL,"
            " data TEXT NOT NULL)"
        )
        for column in ("run_id", "arm", "created_at", "decision"):
            connection.execute(f"CREATE INDEX records_{column} ON records ({column})")
        connection.execute(
            "INSERT INTO records (record_id, run_id, arm, created_at, decision, schema_version, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.record_id, record.run_id, record.arm, record.created_at, record.decision, 2, record.to_json()),
        )
    schema_before = connection.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    connection.close()
    with QualityLog(path) as log:
        assert log.read() == [record] and log.feedback() == []
        log.write(make_record(1))
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema_before
    connection.close()
    with QualityLog(path) as log:
        log.add_feedback(record.record_id, "down")
        assert [item.score for item in log.feedback()] == [0.0]
        assert len(log.read()) == 2
