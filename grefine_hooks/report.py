"""The A/B quality report: one self-contained HTML file from a quality log (``grefine report``).

People reviewing a run want the arms' numbers, where refinement helped, and the pictures, in a
file they can mail or open offline. So nothing is fetched: thumbnails are embedded as base64 JPEG,
the CSS is inline, the before/after plot is inline SVG drawn here, and there is no script. All
text from the log (prompts, reasons, paths) is escaped, since prompts may hold HTML.

>>> write_report("runs/quality.jsonl", "runs/report.html", max_thumbnails=20)  # doctest: +SKIP
PosixPath('runs/report.html')
"""

from __future__ import annotations

import base64
import errno
import html
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from .ab_stats import ARM_ROWS, DIFFERENCE_ROWS, Comparison, format_difference, format_value
from .records import ARMS, DECISIONS, QualityLog, QualityRecord, is_database_url, resolve_record_path

THUMBNAIL_SIZE = 256
DEFAULT_MAX_THUMBNAILS = 50
# Records that went through refinement and have a before and an after image to compare.
_COMPARED = ("refined", "reverted")
# Map overlays shown for every compared record, in this order, then any others the record saved.
_MAP_NAMES = ("P", "A")
_POINT_STYLE = {
    "refined": 'fill="#1f6fb2" stroke="#1f6fb2"',
    "reverted": 'fill="none" stroke="#d2691e" stroke-width="1.5"',
}

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; color: #222; margin: 24px; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.meta, .note { color: #555; } .warning { color: #a40000; font-weight: 600; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #eef2f6; } td:first-child, th:first-child { text-align: left; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
.record-card { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 10px 12px; margin: 12px 0; }
.record-card h3 { font-size: 15px; margin: 0 0 4px; }
.prompt { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; margin: 4px 0; }
.images { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 8px; }
figure { margin: 0; max-width: 256px; }
figure img { display: block; min-width: 128px; max-width: 256px; max-height: 256px; } /* tiny images scaled up */
figcaption { font-size: 12px; color: #555; }
.absent { width: 240px; height: 120px; padding: 8px; border: 1px dashed #b55; color: #a40000;
  font-size: 12px; word-break: break-all; overflow: hidden; }
"""


def write_report(
    log_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    run_id: str | None = None,
    max_thumbnails: int = DEFAULT_MAX_THUMBNAILS,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Renders the log at ``log_path`` (a file or a ``postgresql://`` URL; optionally one run) into ``out_path``.

    Raises FileNotFoundError when the log or the output's directory does not exist, ValueError
    for a log that is not a readable quality log or bad arguments, and other OSErrors as raised
    (a database server that cannot be reached). A log file is checked before opening, since
    opening a missing log would create an empty one.
    """
    url = is_database_url(log_path)
    log_path, out_path = (log_path if url else Path(log_path)), Path(out_path)
    if not url and not log_path.exists():
        raise FileNotFoundError(errno.ENOENT, "quality log does not exist", str(log_path))
    if not out_path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the output's directory does not exist", str(out_path.parent))
    if out_path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "out is a directory, not a file", str(out_path))
    if not url and out_path.exists() and out_path.resolve() == log_path.resolve():
        raise ValueError(f"out {str(out_path)!r} is the quality log itself; choose another file")
    with QualityLog(log_path) as log:
        page = render_report(log, run_id=run_id, max_thumbnails=max_thumbnails, evaluation=evaluation)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def render_report(
    log: QualityLog,
    *,
    run_id: str | None = None,
    max_thumbnails: int = DEFAULT_MAX_THUMBNAILS,
    evaluation: dict[str, Any] | None = None,
) -> str:
    """The report of an open log as one HTML document; relative image paths are read from the log's directory.

    ``evaluation`` (the document of ``grefine evaluate``'s ``evaluation.json``) adds its
    quality-gain table as a section.

    The comparison table shows :meth:`QualityLog.compare`'s numbers as they are (seed 0), so the
    report and ``grefine ab`` never disagree.
    """
    if isinstance(max_thumbnails, bool) or not isinstance(max_thumbnails, int) or max_thumbnails < 0:
        raise ValueError(f"max_thumbnails must be an integer >= 0, got {max_thumbnails!r}")
    records = log.read(run_id=run_id)
    skipped_lines = log.skipped_lines
    if not records and skipped_lines:
        raise ValueError(
            f"quality log {log.location!r} holds no readable record ({skipped_lines} unreadable line(s)): "
            "it is corrupted or not a quality log"
        )
    summary = log.summary(run_id=run_id)
    comparison = log.compare(run_id=run_id)
    compared = [record for record in records if record.decision in _COMPARED]
    failed = [record for record in records if record.decision == "failed"]
    scope = f"run {run_id!r}" if run_id is not None else f"{len({record.run_id for record in records})} run(s)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>G-Refine quality report: {_text(log.path.name if log.path is not None else log.location)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>G-Refine quality report</h1>",
        f'<p class="meta">Log <code>{_text(log.location)}</code> &middot; {_text(scope)} &middot; '
        f"{len(records)} record(s) &middot; generated {_text(_now())}</p>",
    ]
    if skipped_lines:
        parts.append(f'<p class="warning">{skipped_lines} unreadable line(s) of the log were skipped.</p>')
    if not records:
        missing = f"for run {run_id!r}" if run_id is not None else "at all"
        parts.append(f'<p class="warning" id="no-records">The log holds no records {_text(missing)}.</p>')
    parts += ["<h2>Arms</h2>", _summary_table(summary)]
    parts += ["<h2>Treatment vs control</h2>", _comparison_section(comparison)]
    parts += ["<h2>Scores before and after refinement</h2>", _scatter_section(compared)]
    parts += ["<h2>Refined and reverted images</h2>", _cards_section(compared, log.path, max_thumbnails)]
    if failed:
        parts += ["<h2>Failed refinements</h2>", _failed_section(failed, max_thumbnails)]
    if evaluation is not None:
        parts.append(evaluation_section(evaluation))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_evaluation_page(evaluation: dict[str, Any]) -> str:
    """A self-contained HTML page of a ``grefine evaluate`` table (``evaluation.json``'s document)."""
    settings = evaluation.get("settings", {})
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>G-Refine quality gain: {_text(settings.get('model', ''))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>G-Refine quality gain</h1>",
        f'<p class="meta">Model <code>{_text(settings.get("model", "?"))}</code> &middot; '
        f"{evaluation['prompts']} prompt(s) &middot; seed {settings.get('seed', '?')} &middot; generated {_text(_now())}</p>",
        evaluation_section(evaluation),
        "</body></html>",
    ]) + "\n"


def evaluation_section(evaluation: dict[str, Any]) -> str:
    """The quality-gain table of ``grefine evaluate`` (its JSON document) as an HTML section.

    One table per metric group: each method's mean, its change from the base images with the
    interval, the share of images made worse; then negative optimisations, refine rate and cost.
    A metric that did not load is listed with its reason, never left out.
    """
    metrics, methods = evaluation["metrics"], evaluation["methods"]
    level = f"{100 * evaluation['confidence']:g}%"
    loaded = [metric for metric in metrics if metric["error"] is None]
    header = "".join(
        f'<th colspan="3">{_text(metric["name"])} {"&darr;" if metric["lower_better"] else "&uarr;"}</th>'
        for metric in loaded
    )
    sub_header = "".join(f"<th>mean</th><th>change [{_text(level)}]</th><th>worse</th>" for _ in loaded)
    rows = []
    for name, row in methods.items():
        cells = []
        for metric in loaded:
            cell = row["cells"][metric["name"]]
            change = "" if cell["change"] is None else f"{cell['change']:+.4g}"
            if cell["low"] is not None:
                change += f" [{cell['low']:+.3g}, {cell['high']:+.3g}]"
            negative = cell["change"] is not None and (
                cell["change"] > 0 if metric["lower_better"] else cell["change"] < 0
            )
            css = ' class="warning"' if negative else ""
            cells.append(
                f"<td>{_evaluation_number(cell['mean'])}</td><td{css}>{_text(change or '–')}</td>"
                f"<td>{_percent(cell['worse_share'])}</td>"
            )
        rows.append(f'<tr data-method="{_text(name)}"><td>{_text(name)}</td>{"".join(cells)}</tr>')
    summary = []
    for name, row in methods.items():
        on_mean = "–" if name == "base" else f"{row['negatives_on_mean']}/{len(loaded)}"
        significant = "–" if name == "base" else str(row["negatives_significant"])
        summary.append(
            f'<tr data-method="{_text(name)}"><td>{_text(name)}</td>'
            f"<td>{on_mean}</td><td>{significant}</td>"
            f"<td>{_number(row['negatives_per_image'])}</td><td>{_percent(row['refine_rate'])}</td>"
            f"<td>{_number(row['seconds_per_image'])}</td></tr>"
        )
    missing = "".join(
        f'<li data-metric="{_text(metric["name"])}"><strong>{_text(metric["name"])}</strong>: not scored: '
        f"{_text(metric['error'])}</li>"
        for metric in metrics if metric["error"] is not None
    )
    descriptions = "".join(
        f"<li><strong>{_text(name)}</strong>: {_text(text)}</li>"
        for name, text in evaluation.get("method_descriptions", {}).items()
    )
    return (
        '<section id="evaluation"><h2>Quality gain over the base images</h2>'
        '<table id="evaluation-metrics"><thead><tr><th rowspan="2">method</th>' + header + "</tr>"
        f"<tr>{sub_header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<table id="evaluation-summary" style="margin-top: 12px"><thead><tr><th>method</th><th>negatives on mean</th>'
        "<th>significant</th><th>negatives per image</th><th>refine rate</th><th>s / image</th></tr></thead>"
        f"<tbody>{''.join(summary)}</tbody></table>"
        + (f'<ul id="evaluation-missing" class="warning">{missing}</ul>' if missing else "")
        + f'<ul class="note">{descriptions}</ul>'
        f'<p class="note">change: mean over prompts of (method &minus; base), {_text(level)} bootstrap interval '
        f"(BCa, {evaluation['n_resamples']} resamples, seed {evaluation['seed']}; none below "
        f"{evaluation['min_pairs']} prompts); red: worse than the base on the mean (a negative optimisation, the paper&rsquo;s count); "
        "worse: share of images worse than their own base image. &uarr; higher is better, &darr; lower is better.</p>"
        "</section>"
    )


def _evaluation_number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """One body row per arm, the numbers exactly as :meth:`QualityLog.summary` defines them."""
    header = (
        "Arm", "Images", "p before", "a before", "p after", "a after", "p final", "a final",
        "Refine rate", "Improved", "Added s (mean)", *DECISIONS,
    )
    rows = []
    for arm in ARMS:
        numbers = summary[arm]
        cells = [
            arm,
            str(numbers["count"]),
            *(_number(numbers[key]) for key in (
                "p_before_mean", "a_before_mean", "p_after_mean", "a_after_mean", "p_final_mean", "a_final_mean"
            )),
            _percent(numbers["refine_rate"]),
            _percent(numbers["improved_share"]),
            _number(numbers["added_seconds_mean"]),
            *(str(numbers["decisions"][decision]) for decision in DECISIONS),
        ]
        rows.append(f'<tr data-arm="{_text(arm)}">' + "".join(f"<td>{_text(cell)}</td>" for cell in cells) + "</tr>")
    return (
        '<table id="summary" class="summary">'
        "<thead><tr>" + "".join(f"<th>{_text(name)}</th>" for name in header) + "</tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table>"
        '<p class="note">Means are over the records that have the score. &ldquo;after&rdquo; includes reverted '
        "images (what the refiner produced); &ldquo;final&rdquo; is the score of the image the caller got. "
        "Refine rate: share of records refinement ran on (refined, reverted or failed). Improved: share of "
        "kept refinements whose p + a rose. Added seconds: scoring and refinement on top of generation.</p>"
    )


def _comparison_section(comparison: Comparison) -> str:
    """Per-arm numbers (feedback included), each difference with its interval, and the verdict."""
    arm_rows = "".join(
        f'<tr data-row="{_text(name)}"><td>{_text(label)}</td>'
        + "".join(f"<td>{_text(format_value(form, getattr(comparison.arms[arm], name)))}</td>" for arm in ARMS)
        + "</tr>"
        for label, name, form in ARM_ROWS
    )
    difference_rows = []
    for metric, (label, form) in DIFFERENCE_ROWS.items():
        estimate, interval = format_difference(comparison.differences[metric], form)
        difference_rows.append(
            f'<tr data-metric="{_text(metric)}"><td>{_text(label)}</td><td>{_text(estimate)}</td>'
            f"<td>{_text(interval)}</td></tr>"
        )
    level = f"{100 * comparison.confidence:g}%"
    return (
        '<table id="comparison-arms"><thead><tr><th></th>'
        + "".join(f"<th>{_text(arm)}</th>" for arm in ARMS)
        + f"</tr></thead><tbody>{arm_rows}</tbody></table>"
        f'<table id="comparison-differences"><thead><tr><th>treatment &minus; control</th><th>difference</th>'
        f"<th>{_text(level)} interval</th></tr></thead><tbody>{''.join(difference_rows)}</tbody></table>"
        f'<p id="verdict"><strong>{_text(comparison.verdict)}</strong></p>'
        f'<p class="note">Bootstrap intervals (BCa, {comparison.n_resamples} resamples, seed {comparison.seed}), '
        "the arms resampled independently; feedback is averaged per image first, then over images. "
        "The same numbers as <code>grefine ab</code>.</p>"
    )


def _scatter_section(records: list[QualityRecord]) -> str:
    panels = []
    for offset, name in ((0, "p"), (330, "a")):
        points = [
            (getattr(record, f"{name}_before"), getattr(record, f"{name}_after"), record)
            for record in records
            if getattr(record, f"{name}_before") is not None and getattr(record, f"{name}_after") is not None
        ]
        panels.append((offset, name, points))
    if not any(points for _, _, points in panels):
        return '<p class="note" id="no-scatter">No refined or reverted image has before and after scores to plot.</p>'
    body = "".join(_scatter_panel(offset, name, points) for offset, name, points in panels)
    legend = (
        '<g transform="translate(60,348)">'
        f'<circle cx="0" cy="0" r="4" {_POINT_STYLE["refined"]}/><text x="8" y="4">refined (kept)</text>'
        f'<circle cx="120" cy="0" r="4" {_POINT_STYLE["reverted"]}/><text x="128" y="4">reverted by the guard</text>'
        '<text x="300" y="4">points above the dashed line improved</text></g>'
    )
    return (
        '<svg id="scatter" width="660" height="362" viewBox="0 0 660 362" role="img" '
        'aria-label="p and a before versus after refinement">' + body + legend + "</svg>"
    )


def _scatter_panel(offset: int, name: str, points: list[tuple[float, float, QualityRecord]]) -> str:
    """One square panel, ``before`` on x and ``after`` on y, both in [0, 1], with the y = x line."""
    left, top, size = 48, 26, 260

    def x(value: float) -> float:
        return left + value * size

    def y(value: float) -> float:
        return top + (1.0 - value) * size

    parts = [
        f'<g transform="translate({offset},0)">',
        f'<text x="{left + size / 2}" y="16" text-anchor="middle" font-weight="bold">{name}: before vs after '
        f"({len(points)} image(s))</text>",
        f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="#fff" stroke="#888"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line x1="{x(tick)}" y1="{top}" x2="{x(tick)}" y2="{top + size}" stroke="#eee"/>'
            f'<line x1="{left}" y1="{y(tick)}" x2="{left + size}" y2="{y(tick)}" stroke="#eee"/>'
            f'<text x="{x(tick)}" y="{top + size + 14}" text-anchor="middle">{tick:g}</text>'
            f'<text x="{left - 6}" y="{y(tick) + 4}" text-anchor="end">{tick:g}</text>'
        )
    parts += [
        f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#888" stroke-dasharray="5 4"/>',
        f'<text x="{left + size / 2}" y="{top + size + 32}" text-anchor="middle">{name} before</text>',
        f'<text transform="translate(14,{top + size / 2}) rotate(-90)" text-anchor="middle">{name} after</text>',
    ]
    for before, after, record in points:
        label = f"{record.decision}: {name} {before:.3f} -> {after:.3f}; {record.prompt or '(no prompt)'}"
        parts.append(
            f'<circle class="point {record.decision}" cx="{x(before):.1f}" cy="{y(after):.1f}" r="4" '
            f"{_POINT_STYLE[record.decision]}><title>{_text(label)}</title></circle>"
        )
    parts.append("</g>")
    return "".join(parts)


def _cards_section(records: list[QualityRecord], log_path: Path, max_thumbnails: int) -> str:
    if not records:
        return '<p class="note" id="no-cards">No image was refined or reverted.</p>'
    shown = records[:max_thumbnails]
    parts = [_card(number, record, log_path) for number, record in enumerate(shown, start=1)]
    omitted = len(records) - len(shown)
    if omitted:
        parts.append(
            f'<p class="note" id="omitted">{omitted} more refined or reverted image(s) omitted '
            f"(showing {len(shown)} of {len(records)}; raise --max-thumbnails to see them).</p>"
        )
    return "\n".join(parts)


def _card(number: int, record: QualityRecord, log_path: Path) -> str:
    """Original, refined, then the map overlays of one record, with its prompt, scores and decision."""
    second = "refined" if record.decision == "refined" else "returned image (reverted: the guard kept the original)"
    figures = [
        _figure("original", record.original_image_path, log_path),
        _figure(second, record.image_path, log_path),
    ]
    extra = sorted(set(record.map_paths) - set(_MAP_NAMES))
    for name in (*_MAP_NAMES, *extra):
        figures.append(_figure(f"{name} overlay", record.map_paths.get(name), log_path))
    facts = [
        f"{record.arm} arm",
        f"decision {record.decision}",
        f"guard {record.guard}" if record.guard is not None else "guard did not run",
        f"seed {record.seed}" if record.seed is not None else "seed unknown",
        f"image {record.image_index} of run {record.run_id}",
        f"added {record.added_seconds:.2f} s",
    ]
    return (
        f'<article class="record-card" data-record-id="{_text(record.record_id)}">'
        f"<h3>#{number} &middot; {_text(record.decision)} &middot; {_scores(record)}</h3>"
        f'<p class="prompt">{_text(record.prompt if record.prompt is not None else "(no prompt recorded)")}</p>'
        f'<p class="meta">{" &middot; ".join(_text(fact) for fact in facts)}<br>'
        f"reason: {_text(record.reason)}</p>"
        f'<div class="images">{"".join(figures)}</div></article>'
    )


def _figure(caption: str, path: str | None, log_path: Path) -> str:
    """A thumbnail, or a note in its place saying why there is none (a report never fails on an image)."""
    if path is None:
        body = f'<div class="absent">no {_text(caption)} image recorded</div>'
    else:
        resolved = resolve_record_path(path, log_path)
        try:
            data = _thumbnail(resolved)
        except FileNotFoundError:
            body = f'<div class="absent">image not found: {_text(resolved)}</div>'
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            body = f'<div class="absent">image unreadable: {_text(resolved)}: {_text(error)}</div>'
        else:
            body = f'<img src="data:image/jpeg;base64,{data}" alt="{_text(caption)}" title="{_text(resolved)}">'
    return f"<figure>{body}<figcaption>{_text(caption)}</figcaption></figure>"


def _thumbnail(path: Path) -> str:
    """The image at most THUMBNAIL_SIZE on a side, as base64 JPEG (transparency laid on white)."""
    with Image.open(path) as image:
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
        else:
            flat = image.convert("RGB")
    buffer = io.BytesIO()
    flat.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _failed_section(records: list[QualityRecord], max_rows: int) -> str:
    rows = [
        f"<tr><td>{_text(record.prompt or '(no prompt)')}</td><td>{_text(record.arm)}</td>"
        f"<td>{_text(record.reason)}</td><td>{_text(record.error or '(no error recorded)')}</td></tr>"
        for record in records[:max_rows]
    ]
    omitted = len(records) - len(rows)
    note = f'<p class="note">{omitted} more failed record(s) omitted.</p>' if omitted else ""
    return (
        '<table id="failed"><thead><tr><th>Prompt</th><th>Arm</th><th>Reason</th><th>Error</th></tr></thead>'
        "<tbody>" + "".join(rows) + "</tbody></table>" + note
    )


def _scores(record: QualityRecord) -> str:
    return " &middot; ".join(
        f"{name} {_number(getattr(record, f'{name}_before'))} &rarr; {_number(getattr(record, f'{name}_after'))}"
        for name in ("p", "a")
    )


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
