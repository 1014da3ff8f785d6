"""Quality records and the A/B quality log: what happened to every generated image, kept durably.

Every image a wrapped pipeline returns yields one :class:`QualityRecord`: the parameters that made
it and what the refiner did (ADetailer's per-image ``extra_params``, for every image).
:func:`assign_arm` splits images reproducibly into a control arm (scored only) and a treatment arm
(refined by the policy), and :class:`QualityLog` appends the records, and the users' :class:`Feedback`
on them, to a JSONL file, a SQLite database or a PostgreSQL database that threads, processes and
hosts may write at once, and that keeps every record whose ``write()`` returned even when the
writer is killed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import numbers
import os
import statistics
import threading
import uuid
import weakref
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    from .ab_stats import Comparison

logger = logging.getLogger(__name__)

# 2 added request_id and replica (who asked for the image, which server made it); version-1
# records read back with both None.
SCHEMA_VERSION = 2
ARMS = ("control", "treatment")
DECISIONS = ("skipped", "refined", "reverted", "failed")
# Decisions in which refinement ran: stage 1 started, whatever came of it.
REFINE_DECISIONS = ("refined", "reverted", "failed")
# The timings the refiner adds on top of generation (see QualityRecord.added_seconds).
ADDED_TIMING_KEYS = ("score", "stage1", "stage2", "rescore")
# Log file suffix -> sink; a postgresql:// URL is the "postgresql" sink.
SINKS = {".jsonl": "jsonl", ".sqlite": "sqlite", ".sqlite3": "sqlite", ".db": "sqlite"}
SINK_NAMES = ("jsonl", "sqlite", "postgresql")
# The feedback layout, versioned on its own: records and feedback change independently. A SQL log
# keeps it in meta as feedback_schema_version; a JSONL log's feedback lines carry it.
FEEDBACK_SCHEMA_VERSION = 1
# Thumbs as scores on the rating scale [0, 1].
THUMBS = {"up": 1.0, "down": 0.0}

_SCORE_FIELDS = ("p_before", "a_before", "p_after", "a_after")
_OPTIONAL_TEXT_FIELDS = (
    "model_id", "prompt", "negative_prompt", "guard", "error", "emphasized_prompt", "request_id", "replica"
)
_PATH_FIELDS = ("image_path", "original_image_path")


class UnknownRecordError(KeyError):
    """Feedback named a record_id the log does not hold (a KeyError whose text is the message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _utc_now() -> str:
    return _utc_text(datetime.now(timezone.utc))


def _new_record_id() -> str:
    return uuid.uuid4().hex


@dataclass(kw_only=True)
class QualityRecord:
    """One generated image: the parameters that made it and what the refiner did with it.

    Keyword-only. Required: ``run_id``, ``pipeline_class``, ``image_index``, ``arm``, ``decision``,
    ``reason``; everything else defaults to "not known / did not happen" (None or empty).

    Attributes:
        run_id (`str`): one per pipeline call or batch job. record_id (`str`): uuid4 hex.
        created_at (`str`): UTC ISO-8601 with microseconds, e.g. ``2026-01-02T03:04:05.678901+00:00``;
            only this exact form is accepted, so that text order is time order in both sinks.
        schema_version (`int`): the record layout, :data:`SCHEMA_VERSION` when written.
        pipeline_class, model_id, prompt, negative_prompt, seed, image_index: what made the image.
        arm (`str`): ``"control"`` (scored only, so never ``"refined"`` or ``"reverted"``) or
            ``"treatment"`` (the policy applied).
        p_before, a_before, p_after, a_after (`float`, *optional*): scores in [0, 1] before and
            after refinement.
        decision (`str`): ``"skipped"``, ``"refined"``, ``"reverted"`` (refined, then the guard
            kept the original) or ``"failed"`` (a refine stage raised; the original was returned).
        reason (`str`): why, for humans, e.g. ``"p 0.62 >= 0.50 and a 0.71 >= 0.50"``.
        stage1_strength, stage1_steps, stage2_strength, stage2_steps: what the stages ran with.
        guard (`str`, *optional*): the guard's verdict, e.g. ``"kept"``; None when it did not run.
        timings (`dict[str, float]`): seconds per step (generate, score, stage1, stage2, rescore,
            total, ...). error (`str`, *optional*): the error a failed refinement raised.
        image_path, original_image_path (`str`, *optional*): where the images were saved.
        map_paths (`dict[str, str]`): where map images were saved, by name (``"P"``, ``"A"``, ``"mask"``).
        maps (`dict[str, float]`): map summaries such as ``P_mean``, ``A_mean``, ``mask_share``.
        phrases (`list[dict]`): the prompt's phrases (noun, text, defect, ...), JSON-ready.
        emphasized_prompt (`str`, *optional*), policy (`dict`): ``RefinePolicy.to_dict()``.
        request_id (`str`, *optional*): the service request that asked for the image, so an
            app's own logs and the quality log join; None outside a service.
        replica (`str`, *optional*): which server process (or Ray replica) made the image.

    Numbers are stored as plain ``float``/``int`` (a ``numpy.float32`` score becomes a ``float``) so
    the record always serialises; anything else invalid raises ValueError naming the field.
    """

    run_id: str
    record_id: str = field(default_factory=_new_record_id)
    created_at: str = field(default_factory=_utc_now)
    schema_version: int = SCHEMA_VERSION
    pipeline_class: str
    model_id: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    image_index: int
    arm: str
    p_before: float | None = None
    a_before: float | None = None
    decision: str
    reason: str
    stage1_strength: float | None = None
    stage1_steps: int | None = None
    stage2_strength: float | None = None
    stage2_steps: int | None = None
    p_after: float | None = None
    a_after: float | None = None
    guard: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    image_path: str | None = None
    original_image_path: str | None = None
    map_paths: dict[str, str] = field(default_factory=dict)
    maps: dict[str, float] = field(default_factory=dict)
    phrases: list[dict] = field(default_factory=list)
    emphasized_prompt: str | None = None
    policy: dict = field(default_factory=dict)
    request_id: str | None = None
    replica: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks every field; run again before serialising, since a record can be edited after creation."""
        _check_schema_version(self.schema_version)
        for name in ("run_id", "record_id", "pipeline_class"):
            check_key_text(name, getattr(self, name))
        _check_created_at(self.created_at)
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        if self.arm == "control" and self.decision in ("refined", "reverted"):
            raise ValueError(f"decision cannot be {self.decision!r} in the control arm: it is never refined")
        if not isinstance(self.reason, str):
            raise ValueError(f"reason must be a string, got {self.reason!r}")
        for name in _PATH_FIELDS:
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        for name in _OPTIONAL_TEXT_FIELDS + _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")
        self.image_index = _integer("image_index", self.image_index, minimum=0)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
        for name in ("stage1_steps", "stage2_steps"):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(name, getattr(self, name), minimum=0))
        for name in _SCORE_FIELDS + ("stage1_strength", "stage2_strength"):
            if getattr(self, name) is not None:
                setattr(self, name, _unit(name, getattr(self, name)))
        self.timings = _number_dict("timings", self.timings, minimum=0.0)
        self.maps = _number_dict("maps", self.maps)
        if not isinstance(self.map_paths, dict) or not all(
            isinstance(path, (str, os.PathLike)) for path in self.map_paths.values()
        ):
            raise ValueError(f"map_paths must be a dict of name -> path, got {self.map_paths!r}")
        self.map_paths = {str(name): os.fspath(path) for name, path in self.map_paths.items()}
        if not isinstance(self.phrases, list) or not all(isinstance(item, dict) for item in self.phrases):
            raise ValueError(f"phrases must be a list of dicts, got {self.phrases!r}")
        if not isinstance(self.policy, dict):
            raise ValueError(f"policy must be a dict (RefinePolicy.to_dict()), got {type(self.policy).__name__}")
        for name in ("phrases", "policy"):
            try:
                json.dumps(getattr(self, name), allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{name} must be JSON-serialisable with finite numbers: {error}") from None

    @property
    def added_seconds(self) -> float:
        """Seconds the refiner added beyond generation: the score, stage1, stage2 and rescore timings present."""
        return math.fsum(self.timings.get(key, 0.0) for key in ADDED_TIMING_KEYS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """One line of JSON (newlines inside strings are escaped); validates first, so it always reads back."""
        self.validate()
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QualityRecord:
        """Rebuilds a record; unknown or missing fields and newer schema versions are errors."""
        return _from_fields(cls, values, _check_schema_version, SCHEMA_VERSION)

    @classmethod
    def from_json(cls, text: str | bytes) -> QualityRecord:
        return cls.from_dict(json.loads(text))


@dataclass(kw_only=True)
class Feedback:
    """A user's verdict on one logged image, appended next to its record (several per record allowed).

    Attributes:
        record_id (`str`): the :class:`QualityRecord` judged.
        score (`float`): in [0, 1], 1 = liked; thumbs are ``"up"`` (1.0) / ``"down"`` (0.0) or
            ``True`` / ``False``, stored as those numbers so ratings and thumbs average together.
        source (`str`, defaults to `"user"`): who or what gave it (``"user"``, ``"moderator"``,
            an app's name), so feedback of different kinds can be told apart later.
        comment (`str`, *optional*): free text.
        feedback_id (`str`): uuid4 hex. created_at (`str`): as in :class:`QualityRecord`.
        schema_version (`int`): the feedback layout, :data:`FEEDBACK_SCHEMA_VERSION` when written.
    """

    record_id: str
    score: float
    source: str = "user"
    comment: str | None = None
    feedback_id: str = field(default_factory=_new_record_id)
    created_at: str = field(default_factory=_utc_now)
    schema_version: int = FEEDBACK_SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_feedback_version(self.schema_version)
        for name in ("record_id", "source", "feedback_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.score = feedback_score(self.score)
        if self.comment is not None and not isinstance(self.comment, str):
            raise ValueError(f"comment must be a string or None, got {self.comment!r}")
        _check_created_at(self.created_at)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        self.validate()
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Feedback:
        """Rebuilds feedback; unknown or missing fields and newer schema versions are errors."""
        return _from_fields(cls, values, _check_feedback_version, FEEDBACK_SCHEMA_VERSION)


def _from_fields(cls: type, values: Any, check_version: Callable[[Any], None], current_version: int) -> Any:
    """``cls(**values)`` for a dataclass read back from a log: the fields checked by name first."""
    if not isinstance(values, Mapping):
        raise ValueError(f"a {cls.__name__} is a JSON object, got {type(values).__name__}")
    # A newer writer may have added fields: say so before complaining about them.
    check_version(values.get("schema_version", current_version))
    unknown = sorted(set(values) - {item.name for item in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
    missing = sorted(
        item.name for item in fields(cls)
        if item.name not in values and item.default is MISSING and item.default_factory is MISSING
    )
    if missing:
        raise ValueError(f"{cls.__name__} is missing required field(s) {missing}")
    return cls(**values)


def feedback_score(value: Any) -> float:
    """A verdict as a score in [0, 1]: ``"up"``/``True`` is 1.0, ``"down"``/``False`` 0.0, a number as is."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in THUMBS:
            return THUMBS[text]
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"score must be 'up', 'down' or a number in [0, 1], got {value!r}") from None
    try:
        return _unit("score", value)
    except ValueError:
        raise ValueError(f"score must be 'up', 'down' or a number in [0, 1], got {value!r}") from None


def check_key_text(name: str, value: Any) -> str:
    """A field every sink stores as its own text column: non-empty, and no NUL (PostgreSQL text cannot hold one)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL characters, got {value!r}")
    return value


def assign_arm(run_id: str, prompt: str | None, seed: int | None, image_index: int, ab_split: float) -> str:
    """The A/B arm of one image, ``"treatment"`` with probability ``ab_split``, else ``"control"``.

    The draw is a SHA-256 of ``(run_id, prompt, seed, image_index)`` (not Python's per-process salted
    ``hash``), so rerunning the same job puts every image in the same arm. ``ab_split=1.0`` always
    gives treatment and ``0.0`` always control.

    >>> assign_arm("run-1", "a red cube", 0, 0, ab_split=1.0)
    'treatment'
    """
    _unit("ab_split", ab_split)
    if not isinstance(run_id, str):
        raise ValueError(f"run_id must be a string, got {run_id!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string or None, got {prompt!r}")
    seed = None if seed is None else _integer("seed", seed)
    key = json.dumps([run_id, prompt, seed, _integer("image_index", image_index)]).encode("utf-8")
    # 53 bits give a float in [0, 1) exactly, so the draw is never 1.0 and ab_split=1.0 always wins.
    draw = (int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 11) / 2.0**53
    return "treatment" if draw < ab_split else "control"


def is_database_url(location: Any) -> bool:
    """Whether a quality-log location is a ``postgresql://`` (or ``postgresql+psycopg://``) URL, not a file."""
    return isinstance(location, str) and location.split("://", 1)[0].lower() in (
        "postgresql", "postgres", "postgresql+psycopg"
    )


def record_path(path: str | Path, log_path: str | Path | None) -> str:
    """How a record stores ``path``: relative to the log's directory when inside it, else absolute.

    A log and the images under its directory can then be moved or copied together. A database
    server's log (``log_path`` None) has no directory: its paths are absolute.
    """
    resolved = Path(path).resolve()
    if log_path is None:
        return str(resolved)
    try:
        return resolved.relative_to(Path(log_path).parent.resolve()).as_posix()
    except ValueError:
        return str(resolved)


def resolve_record_path(value: str, log_path: str | Path | None) -> Path:
    """The file a record's path names (the inverse of `record_path`)."""
    path = Path(value)
    return path if path.is_absolute() or log_path is None else Path(log_path).parent / path


class QualityLog:
    """An append-only log of :class:`QualityRecord` and :class:`Feedback`: JSONL, SQLite or PostgreSQL.

    Args:
        path (`str` or `os.PathLike`): a file, created when missing, never truncated or rewritten;
            or a ``postgresql://user@host:port/db`` URL (psycopg 3, the ``[postgres]`` extra).
            Whatever the URL leaves out (host, user, password, database) comes from libpq's
            ``PG*`` environment variables (``PGPASSWORD``, ...) or ``~/.pgpass``; ``postgresql://``
            alone takes everything from there. The password never appears in an error, a log
            line, ``repr`` or :attr:`location`.
        sink (`str`, *optional*): ``"jsonl"``, ``"sqlite"`` or ``"postgresql"``; None chooses
            from the URL scheme or the suffix (``.jsonl``; ``.sqlite``, ``.sqlite3``, ``.db``).

    Every ``write`` is durable (fsynced / committed) before it returns, so a record whose write
    returned survives the writer being killed. Threads may share one log; processes each open
    their own (do not carry an open log across ``fork``) and may write to the same file or
    database at once, from any number of hosts for PostgreSQL. SQLite and PostgreSQL share one
    schema and one SQL code path (:mod:`grefine_hooks.sql_store`); give a PostgreSQL log a
    database of its own. When the server is unreachable ``write`` raises OSError, so the
    pipeline keeps the records queued and writes them once the server is back.

    Reading JSONL: blank lines are ignored; a line that is not JSON is skipped and counted in
    ``skipped_lines`` (set by every ``read``) with a logged warning naming its line number, so one
    torn line (a writer killed mid-write, the disk filling up) never hides the good records after
    it. Writers start every record on a fresh line, so a torn fragment never swallows a later
    record. A line that is valid JSON but not a valid record is not corruption but a different
    writer: it raises ValueError naming the line, as does a record from a newer grefine-hooks.
    SQL logs never have torn rows; their ``skipped_lines`` is always 0. A JSONL log keeps its
    feedback in a file beside it, ``NAME.feedback.jsonl`` (created by the first feedback).

    >>> with QualityLog("runs/quality.jsonl") as log:  # doctest: +SKIP
    ...     log.write(record)
    ...     log.add_feedback(record.record_id, "up")
    ...     print(log.compare().verdict)
    """

    def __init__(self, path: str | os.PathLike, sink: str | None = None):
        url = is_database_url(path)
        if sink is None:
            sink = "postgresql" if url else SINKS.get(Path(path).suffix.lower())
            if sink is None:
                raise ValueError(
                    f"cannot tell the quality log format of {os.fspath(path)!r} from its suffix: use one of "
                    f"{sorted(SINKS)}, a postgresql:// URL, or pass sink='jsonl' or sink='sqlite'"
                )
        elif sink not in SINK_NAMES:
            raise ValueError(f"sink must be one of {SINK_NAMES}, got {sink!r}")
        if (sink == "postgresql") != url:
            raise ValueError(f"sink {sink!r} does not match the quality log location (a postgresql:// URL or a file)")
        self.sink = sink
        self.skipped_lines = 0
        #: The file, or None for a database server.
        self.path: Path | None = None if url else Path(path)
        if self.path is not None:
            _check_location(self.path)
        if sink == "jsonl":
            self._store = _JsonlStore(self.path, QualityRecord.from_dict)
            feedback_path = self.path.with_suffix(".feedback" + self.path.suffix)
            self._feedback = _JsonlStore(feedback_path, Feedback.from_dict, create=False)
        else:
            from .sql_store import SqlStore  # SQLAlchemy loads only for a SQL log

            self._store = SqlStore(
                self.path if self.path is not None else os.fspath(path),
                records_version=SCHEMA_VERSION,
                feedback_version=FEEDBACK_SCHEMA_VERSION,
                check_version=_check_stored_version,
            )
            self._feedback = None
        #: Where the log is, for messages: the file, or the URL without its password.
        self.location: str = str(self.path) if self.path is not None else self._store.name

    @classmethod
    def coerce(cls, value: QualityLog | str | os.PathLike | None) -> QualityLog | None:
        """The log for a pipeline's ``quality_log=`` argument: a QualityLog as is, a path or URL opened, None (off).

        A log opened here from a path belongs to the caller, who closes it; a QualityLog passed in
        stays open.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(value)
        raise TypeError(
            f"quality_log must be a QualityLog, a path, a postgresql:// URL or None, got {type(value).__name__}"
        )

    def write(self, record: QualityRecord) -> None:
        """Appends one record; it is on disk when this returns."""
        self.write_many([record])

    def write_many(self, records: Iterable[QualityRecord]) -> None:
        """Appends records all together (one ``os.write`` / one transaction); on disk when this returns.

        Retrying a failed call with the same records is safe: a failed JSONL append leaves nothing
        behind, and a SQL log skips records it already holds unchanged (a commit that landed though
        the caller saw an error) while refusing a different record under a logged ``record_id``.
        """
        records = list(records)
        for record in records:
            if not isinstance(record, QualityRecord):
                raise TypeError(f"a QualityLog holds QualityRecords, got {type(record).__name__}")
        if not records:
            return
        if self.sink == "jsonl":
            self._store.append(records)
            return
        self._store.append([_record_row(record) for record in records])

    def read(
        self,
        run_id: str | None = None,
        arm: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
    ) -> list[QualityRecord]:
        """The records in write order, optionally of one run / arm, created in ``[since, until)``.

        ``since`` and ``until`` are timezone-aware datetimes or ISO-8601 strings with an offset.
        Sets ``skipped_lines`` (see the class docstring).
        """
        if arm is not None and arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS} or None, got {arm!r}")
        start = None if since is None else _as_utc_text("since", since)
        end = None if until is None else _as_utc_text("until", until)
        if self.sink == "jsonl":
            records, self.skipped_lines = self._store.load(lambda record: _matches(record, run_id, arm, start, end))
            return records
        return _parse_rows(self._store.load(run_id, arm, start, end), QualityRecord.from_json, self.location)

    def add_feedback(
        self, record_id: str, score: float | bool | str, *, source: str = "user", comment: str | None = None
    ) -> Feedback:
        """Appends a user's verdict on a logged image and returns it; durable when this returns.

        Args:
            record_id (`str`): the record judged; one not in the log raises `UnknownRecordError`
                (a KeyError) naming it.
            score (`float`, `bool` or `str`): a rating in [0, 1] (1 = liked), or thumbs
                ``"up"``/``"down"`` (``True``/``False``), stored as 1.0/0.0.
            source (`str`, defaults to `"user"`), comment (`str`, *optional*): see :class:`Feedback`.

        Append-only: a second verdict on a record is a second row, never an overwrite.
        """
        feedback = Feedback(record_id=record_id, score=score, source=source, comment=comment)
        if self.sink == "jsonl":
            if not any(record.record_id == record_id for record in self.read()):
                raise UnknownRecordError(f"record_id {record_id!r} is not in quality log {self.location}")
            self._feedback.append([feedback])
            return feedback
        row = {"feedback_id": feedback.feedback_id, "record_id": record_id, "created_at": feedback.created_at,
               "schema_version": feedback.schema_version, "data": feedback.to_json()}
        try:
            self._store.append_feedback(row)
        except KeyError:
            raise UnknownRecordError(f"record_id {record_id!r} is not in quality log {self.location}") from None
        return feedback

    def feedback(self, record_ids: Iterable[str] | None = None) -> list[Feedback]:
        """The feedback in write order, optionally only on these records."""
        wanted = None if record_ids is None else set(record_ids)
        if self.sink == "jsonl":
            items, _ = self._feedback.load(lambda item: wanted is None or item.record_id in wanted)
            return items
        rows = self._store.load_feedback(None if wanted is None else sorted(wanted))
        return _parse_rows(rows, lambda data: Feedback.from_dict(json.loads(data)), self.location)

    def summary(self, run_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Per-arm statistics of the log (or of one run), for comparing the arms.

        Returns ``{"control": {...}, "treatment": {...}}``, both arms always present. Each holds:

        - ``count``: records in the arm; ``decisions``: count per decision.
        - ``p_before_mean``, ``a_before_mean``, ``p_after_mean``, ``a_after_mean``: means over the
          records that have that score (None when none does). ``p_after`` includes reverted
          images: it is what the refiner produced, kept or not.
        - ``p_final_mean``, ``a_final_mean``: the score of the image the caller got, i.e. the
          "after" score when the decision is ``"refined"`` and the "before" score otherwise
          (skipped, reverted and failed return the original); refined records without an after
          score are left out. This is the number the A/B comparison is about.
        - ``refine_rate``: share of records in which refinement ran, decision ``"refined"``,
          ``"reverted"`` or ``"failed"`` (0 in the control arm).
        - ``added_seconds_mean``: mean of :attr:`QualityRecord.added_seconds` (scoring included,
          so the control arm shows what scoring alone costs).
        - ``improved_share``: among records with decision ``"refined"`` and all four scores, the
          share with ``p_after + a_after > p_before + a_before`` (strictly); None when there are none.

        Means and shares are None for an empty arm. :meth:`compare` adds intervals and feedback.
        """
        records = self.read(run_id=run_id)
        return {arm: _arm_summary([record for record in records if record.arm == arm]) for arm in ARMS}

    def compare(
        self, run_id: str | None = None, *, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0
    ) -> Comparison:
        """Treatment against control, with bootstrap intervals: see :func:`grefine_hooks.ab_stats.compare_arms`."""
        from .ab_stats import compare_arms

        # Feedback on records of other runs is ignored by compare_arms.
        return compare_arms(
            self.read(run_id=run_id), self.feedback(), confidence=confidence, n_resamples=n_resamples, seed=seed
        )

    def close(self) -> None:
        """Releases the file / connections; closing twice is fine, writing afterwards is an error."""
        self._store.close()
        if self._feedback is not None:
            self._feedback.close()

    def __enter__(self) -> QualityLog:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QualityLog({self.location!r}, sink={self.sink!r})"


def _record_row(record: QualityRecord) -> dict[str, Any]:
    """A record as a row of the SQL ``records`` table; serialised (and so validated) first."""
    data = record.to_json()
    return {"record_id": record.record_id, "run_id": record.run_id, "arm": record.arm, "created_at": record.created_at,
            "decision": record.decision, "schema_version": record.schema_version, "data": data}


def _parse_rows(rows: list[tuple[int, str]], parse: Callable[[str], Any], location: str) -> list[Any]:
    items = []
    for seq, data in rows:
        try:
            items.append(parse(data))
        except ValueError as error:
            raise ValueError(f"{location}, row {seq}: {error}") from None
    return items


class _JsonlStore:
    """One JSON object per line, appended with ``O_APPEND``; ``flock`` keeps processes' lines whole.

    ``parse`` turns a line's object into a record (or feedback); ``create=False`` leaves the file
    uncreated until the first append, and reads a missing file as empty.
    """

    def __init__(self, path: Path, parse: Callable[[Any], Any], create: bool = True):
        self.path, self._parse = path, parse
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False
        if create:
            self._open_fd()

    def append(self, items: list[Any]) -> None:
        data = "".join(item.to_json() + "\n" for item in items).encode("utf-8")
        with self._lock:
            fd = self._open_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A writer died mid-line: leave its fragment on a line of its own.
                    data = b"\n" + data
                try:
                    view = memoryview(data)
                    while view:  # one write unless the disk is full; the lock keeps a retry contiguous
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except BaseException:
                    # All or nothing: a failed append leaves no partial record behind to be
                    # duplicated when the caller writes the batch again.
                    os.ftruncate(fd, size)
                    raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def load(self, keep: Callable[[Any], bool]) -> tuple[list[Any], int]:
        if self._closed:
            raise ValueError(f"quality log {self.path} is closed")
        try:
            file = open(self.path, "rb")
        except FileNotFoundError:
            if self._fd is None:  # not created yet
                return [], 0
            raise
        with file:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH)  # no half-written line from a live writer
            lines = file.read().split(b"\n")
        unterminated = len(lines)  # line number of the text after the last newline, if any
        items, skipped = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except ValueError:
                skipped.append(number)
                continue
            try:
                item = self._parse(values)
            except ValueError as error:
                raise ValueError(f"{self.path}, line {number}: {error}") from None
            if keep(item):
                items.append(item)
        if skipped:
            torn = " (the last, unterminated, from a writer killed mid-write)" if skipped[-1] == unterminated else ""
            logger.warning("%s: skipped %d unreadable line(s), numbers %s%s", self.path, len(skipped), skipped, torn)
        return items, len(skipped)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                self._closer()

    def _open_fd(self) -> int:
        if self._closed:
            raise ValueError(f"quality log {self.path} is closed")
        if self._fd is None:
            existed = self.path.exists()
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as error:
                raise type(error)(error.errno, f"cannot open quality log: {error.strerror}", str(self.path)) from None
            # Closed by close() or, for a log nobody closed, when it is garbage-collected.
            self._closer = weakref.finalize(self, os.close, self._fd)
            if not existed:
                _fsync_directory(self.path.parent)  # the new file's name survives a crash too
        return self._fd


def _arm_summary(records: list[QualityRecord]) -> dict[str, Any]:
    """One arm's numbers for :meth:`QualityLog.summary` (definitions there)."""
    count = len(records)
    refined = [
        record for record in records
        if record.decision == "refined"
        and None not in (record.p_before, record.a_before, record.p_after, record.a_after)
    ]
    improved = sum(record.p_after + record.a_after > record.p_before + record.a_before for record in refined)
    return {
        "count": count,
        "decisions": {decision: sum(record.decision == decision for record in records) for decision in DECISIONS},
        "p_before_mean": _mean(record.p_before for record in records),
        "a_before_mean": _mean(record.a_before for record in records),
        "p_after_mean": _mean(record.p_after for record in records),
        "a_after_mean": _mean(record.a_after for record in records),
        "p_final_mean": _mean(_final(record, record.p_before, record.p_after) for record in records),
        "a_final_mean": _mean(_final(record, record.a_before, record.a_after) for record in records),
        "refine_rate": sum(record.decision in REFINE_DECISIONS for record in records) / count if count else None,
        "added_seconds_mean": _mean(record.added_seconds for record in records),
        "improved_share": improved / len(refined) if refined else None,
    }


def _final(record: QualityRecord, before: float | None, after: float | None) -> float | None:
    """The score of the image the caller got: only a kept refinement replaced the original."""
    return after if record.decision == "refined" else before


def _mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def _matches(
    record: QualityRecord, run_id: str | None, arm: str | None, since: str | None, until: str | None
) -> bool:
    return (
        (run_id is None or record.run_id == run_id)
        and (arm is None or record.arm == arm)
        and (since is None or record.created_at >= since)
        and (until is None or record.created_at < until)
    )


def _check_location(path: Path) -> None:
    """Clear errors, naming the log, for the directory problems every sink shares."""
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(2, f"cannot open quality log: directory {str(parent)!r} does not exist", str(path))
    if not parent.is_dir():
        raise NotADirectoryError(20, f"cannot open quality log: {str(parent)!r} is not a directory", str(path))
    if path.is_dir():
        raise IsADirectoryError(21, "cannot open quality log: it is a directory", str(path))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_schema_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"schema_version must be an integer >= 1, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {version} was written by a newer grefine-hooks (this one reads up to "
            f"{SCHEMA_VERSION}); upgrade grefine-hooks to read it"
        )


def _check_feedback_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"feedback schema_version must be an integer >= 1, got {version!r}")
    if version > FEEDBACK_SCHEMA_VERSION:
        raise ValueError(
            f"feedback schema_version {version} was written by a newer grefine-hooks (this one reads up to "
            f"{FEEDBACK_SCHEMA_VERSION}); upgrade grefine-hooks to read it"
        )


def _check_stored_version(key: str, version: int) -> None:
    """A SQL log's meta versions: ``schema_version`` (records) and ``feedback_schema_version``."""
    (_check_feedback_version if key.startswith("feedback") else _check_schema_version)(version)


def _check_created_at(value: Any) -> None:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    canonical = moment is not None and moment.utcoffset() is not None and _utc_text(moment) == value
    if not canonical:
        raise ValueError(
            f"created_at must be UTC ISO-8601 with microseconds like '2026-01-02T03:04:05.678901+00:00', got {value!r}"
        )


def _as_utc_text(name: str, value: datetime | str) -> str:
    """A read bound in created_at's exact form, so that comparing text compares times."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{name} must be an ISO-8601 time, got {value!r}") from None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime or ISO-8601 string with an offset, got {value!r}")
    return _utc_text(value)


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _integer(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _unit(name: str, value: Any) -> float:
    value = _finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _number_dict(name: str, values: Any, minimum: float | None = None) -> dict[str, float]:
    if not isinstance(values, dict):
        raise ValueError(f"{name} must be a dict of str -> float, got {type(values).__name__}")
    checked = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings, got {key!r}")
        checked[key] = _finite(f"{name}[{key!r}]", value)
        if minimum is not None and checked[key] < minimum:
            raise ValueError(f"{name}[{key!r}] must be >= {minimum}, got {checked[key]}")
    return checked
