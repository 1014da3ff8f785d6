"""The PostgreSQL sink on a real server: outages queue records, schema checks, and no password ever leaks.

The sink contract tests shared with JSONL and SQLite (round trip, 8 threads and 4 processes x 250,
SIGKILL mid-write, ...) are in test_records.py and test_feedback.py; these are what only a
database server has: it can go away, it needs credentials.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import traceback

import pytest
import torch

from grefine_hooks import RefinePolicy, wrap
from grefine_hooks.records import SCHEMA_VERSION, QualityLog, QualityRecord
from grefine_hooks.testing import tiny_call_kwargs, tiny_pipeline


def make_record(index: int = 0, **values) -> QualityRecord:
    return QualityRecord(run_id=values.pop("run_id", "run"), pipeline_class="P", image_index=index,
                         arm=values.pop("arm", "control"), decision=values.pop("decision", "skipped"),
                         reason="test", **values)


def everything_said(error: BaseException) -> str:
    """An exception as a user could ever see it: str, repr and the whole formatted chain."""
    return f"{error}\n{error!r}\n" + "".join(traceback.format_exception(error))


@pytest.fixture
def outage(postgres_server):
    """Stops the server for the test's outage; it is running again afterwards whatever happens."""
    yield postgres_server
    try:
        postgres_server.start()
    except RuntimeError:
        pass  # the test started it again already


def test_server_stopped_mid_run_then_back_every_record_written_once(postgres_url, outage):
    with QualityLog(postgres_url) as log:
        log.write(make_record(0))
        outage.stop()
        with pytest.raises(OSError, match="cannot write to quality log") as error:
            log.write(make_record(1))
        assert outage.password not in everything_said(error.value)
        with pytest.raises(OSError, match="cannot read quality log"):
            log.read()
        outage.start()
        log.write(make_record(2))  # a fresh connection replaces the dropped one
        assert [record.image_index for record in log.read()] == [0, 2]


def test_pipeline_queues_records_while_the_server_is_down(scorer, postgres_url, outage, caplog):
    """The real path: records of a call during the outage wait on the pipeline and go in after it."""
    pipe = wrap(tiny_pipeline("sd15"), policy=RefinePolicy(p_threshold=0.0, a_threshold=0.0), scorer=scorer,
                quality_log=postgres_url)
    pipe.set_progress_bar_config(disable=True)

    def call(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return pipe(["a red book", "a cat"], generator=generator, **tiny_call_kwargs("sd15", 2))

    first = call(1)
    outage.stop()
    with caplog.at_level(logging.ERROR):
        second = call(2)  # the caller still gets everything
    assert len(second.images) == 2 and len(second.quality) == 2
    assert "kept for retry" in caplog.text and outage.password not in caplog.text
    outage.start()
    third = call(3)
    with QualityLog(postgres_url) as log:
        logged = log.read()
    expected = first.quality + second.quality + third.quality
    assert [record.record_id for record in logged] == [record.record_id for record in expected]
    pipe.quality_log.close()


def test_newer_schema_in_postgres_meta_is_refused_on_open(postgres_url, postgres_server):
    with QualityLog(postgres_url) as log:
        log.write(make_record())
    database = postgres_url.rsplit("/", 1)[1]
    import psycopg

    with psycopg.connect(host=str(postgres_server.root), port=postgres_server.port, user="grefine_admin",
                         dbname=database, autocommit=True) as connection:
        connection.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(ValueError, match="newer grefine-hooks") as error:
        QualityLog(postgres_url)
    assert postgres_server.password not in everything_said(error.value)


def test_retried_write_is_idempotent_and_a_clashing_record_id_refused(postgres_url):
    record, other = make_record(), make_record(1)
    with QualityLog(postgres_url) as log:
        log.write(record)
        log.write_many([other, record])  # a retry whose first commit had landed
        assert log.read() == [record, other]
        clash = make_record(2, record_id=other.record_id)
        with pytest.raises(ValueError, match="already logged with different content"):
            log.write_many([make_record(3), clash])  # all or nothing
        with pytest.raises(ValueError, match="holds a record_id twice"):
            twice = make_record(4)
            log.write_many([twice, twice])
        assert log.read() == [record, other]


def test_a_database_with_other_tables_is_refused(postgres_server):
    url = postgres_server.create_database()
    import psycopg

    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE users (name text)")
    with pytest.raises(ValueError, match="not a grefine-hooks quality log"):
        QualityLog(url)


def test_credentials_from_the_pg_environment(postgres_server, monkeypatch):
    url = postgres_server.create_database()
    database = url.rsplit("/", 1)[1]
    for name, value in (("PGHOST", "127.0.0.1"), ("PGPORT", str(postgres_server.port)), ("PGUSER", "grefine"),
                        ("PGPASSWORD", postgres_server.password), ("PGDATABASE", database)):
        monkeypatch.setenv(name, value)
    with QualityLog("postgresql://") as log:
        log.write(make_record())
        assert len(log.read()) == 1
        assert postgres_server.password not in repr(log) + log.location
    monkeypatch.setenv("PGDATABASE", "no_such_database")
    with pytest.raises(OSError) as error:
        QualityLog("postgresql://")
    assert "no_such_database" in str(error.value) and postgres_server.password not in everything_said(error.value)


@pytest.mark.parametrize("case", ["wrong-password", "missing-database", "server-down", "bad-port"])
def test_no_error_shows_the_password(postgres_server, outage, case):
    password = postgres_server.password
    url = postgres_server.create_database()
    if case == "wrong-password":
        password = password[::-1]
        url = postgres_server.url(url.rsplit("/", 1)[1], password=password)
    elif case == "missing-database":
        url = postgres_server.url("no_such_database")
    elif case == "bad-port":
        url = url.replace(f":{postgres_server.port}/", ":1/")
    else:
        outage.stop()
    with pytest.raises(OSError, match="cannot open quality log postgresql://grefine:\\*\\*\\*@") as error:
        QualityLog(url)
    said = everything_said(error.value)
    assert password not in said and postgres_server.password not in said


def test_password_in_no_record_report_or_command_output(postgres_url, postgres_server, tmp_path, capfd):
    from grefine_hooks.cli import main
    from grefine_hooks.report import write_report

    password = postgres_server.password
    with QualityLog(postgres_url) as log:
        records = [make_record(index, arm=arm, decision="skipped", p_before=0.5, a_before=0.5)
                   for index, arm in enumerate(["control", "treatment"] * 6)]
        log.write_many(records)
        assert all(password not in record.to_json() for record in log.read())
        assert password not in repr(log) and password not in log.location
    report = write_report(postgres_url, tmp_path / "report.html")
    page = report.read_text()
    assert "postgresql://grefine:***@" in page and password not in page
    assert main(["feedback", postgres_url, records[0].record_id, "up"]) == 0
    assert main(["feedback", postgres_url, "no-such-record", "up"]) == 2
    assert main(["ab", postgres_url, "--json"]) == 0
    assert main(["report", postgres_url, "--out", str(tmp_path / "again.html")]) == 0
    out, err = capfd.readouterr()
    assert "no-such-record" in err and password not in out + err
    assert password not in (tmp_path / "again.html").read_text()


def test_the_command_line_takes_a_url_in_a_fresh_process(postgres_url, postgres_server):
    """``grefine`` as users run it: a process of its own, the URL on the command line."""
    with QualityLog(postgres_url) as log:
        record = make_record()
        log.write(record)
    command = [sys.executable, "-m", "grefine_hooks.cli"]
    done = subprocess.run([*command, "feedback", postgres_url, record.record_id, "0.75", "--source", "app"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with QualityLog(postgres_url) as log:
        assert [(item.score, item.source) for item in log.feedback()] == [(0.75, "app")]
    bad = subprocess.run([*command, "ab", postgres_url.replace("/quality_", "/missing_")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing_" in bad.stderr
    assert postgres_server.password not in done.stdout + done.stderr + bad.stdout + bad.stderr


def test_commits_are_synchronous_even_where_the_server_says_otherwise(postgres_url, postgres_server):
    """A database set to ``synchronous_commit=off`` would acknowledge writes before they are flushed."""
    database = postgres_url.rsplit("/", 1)[1]
    with postgres_server.admin() as connection:
        connection.execute(f"ALTER DATABASE {database} SET synchronous_commit = off")
    import psycopg

    with psycopg.connect(postgres_url) as plain:
        assert plain.execute("SHOW synchronous_commit").fetchone() == ("off",)
    with QualityLog(postgres_url) as log:
        log.write(make_record())
        with log._store.engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
