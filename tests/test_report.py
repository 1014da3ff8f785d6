"""The HTML report: self-contained, escaped, faithful to QualityLog.summary(), and it renders in Chromium."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grefine_hooks.cli import main
from grefine_hooks.records import QualityLog, QualityRecord
from grefine_hooks.report import THUMBNAIL_SIZE, write_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
EVIL_PROMPT = 'a cat <script>alert("owned")</script> & a <b>dog</b>'
ORIGINAL_GREEN = (0, 200, 0)  # a colour nothing but the embedded "original" thumbnails has
REFINED_COUNT, REVERTED_COUNT = 3, 1


class Page(HTMLParser):
    """The parts of a report the tests look at: every tag, the summary table's body rows, the cards."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.summary_rows: list[list[str]] = []
        self._table: str | None = None
        self._section: str | None = None
        self._in_cell = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.append((tag, values))
        if tag == "table":
            self._table = values.get("id")
        elif tag in ("thead", "tbody"):
            self._section = tag
        elif self._table == "summary" and self._section == "tbody":
            if tag == "tr":
                self.summary_rows.append([])
            elif tag == "td":
                self._in_cell = True
                self.summary_rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = self._section = None
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.summary_rows[-1][-1] += data

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(
            name == tag and (cls is None or cls in (attrs.get("class") or "").split()) for name, attrs in self.tags
        )

    def resource_urls(self) -> list[str]:
        return [
            value for _, attrs in self.tags for name, value in attrs.items()
            if name in ("src", "href", "xlink:href", "srcset", "poster", "data", "action") and value is not None
        ]


def save_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (384, 320)) -> Path:
    """A solid picture with a stripe, larger than a thumbnail so the report must shrink it."""
    array = np.empty((size[1], size[0], 3), dtype=np.uint8)
    array[:] = colour
    array[: size[1] // 6] = (250, 250, 250)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def build_records(directory: Path) -> list[QualityRecord]:
    """Both arms and every decision; map overlays present, missing on disk, or never recorded."""
    images = directory / "images"
    records = [
        QualityRecord(run_id="run-1", pipeline_class="TinyPipeline", image_index=index, arm="control",
                      decision="skipped", reason="control arm", prompt="a control cat", p_before=0.5,
                      a_before=0.6, timings={"score": 0.2})
        for index in range(2)
    ]
    records.append(QualityRecord(
        run_id="run-1", pipeline_class="TinyPipeline", image_index=2, arm="treatment", decision="skipped",
        reason="p 0.80 >= 0.50 and a 0.90 >= 0.50", prompt="a fine cat", p_before=0.8, a_before=0.9,
        timings={"score": 0.2},
    ))
    for index in range(REFINED_COUNT):
        stem = f"refined{index}"
        save_png(images / f"{stem}_original.png", ORIGINAL_GREEN)
        save_png(images / f"{stem}.png", (40, 90, 220))
        save_png(images / f"{stem}_P.png", (230, 120, 0))
        maps = {"P": f"images/{stem}_P.png"}
        if index == 0:
            maps["A"] = "images/missing_A.png"  # recorded but never written
        elif index == 1:
            maps["A"] = str(save_png(images / f"{stem}_A.png", (200, 0, 120)).resolve())  # absolute path
            maps["mask"] = f"images/{stem}_P.png"
        records.append(QualityRecord(
            run_id="run-2" if index == 2 else "run-1", pipeline_class="TinyPipeline", image_index=3 + index,
            arm="treatment", decision="refined", reason="p 0.30 < 0.50", prompt=f"a red cube number {index}",
            seed=index, p_before=0.3, a_before=0.4, p_after=0.5 + 0.1 * index, a_after=0.35, guard="kept",
            image_path=f"images/{stem}.png", original_image_path=f"images/{stem}_original.png", map_paths=maps,
            timings={"score": 0.2, "stage1": 1.0, "stage2": 0.5, "rescore": 0.2},
        ))
    save_png(images / "reverted_original.png", ORIGINAL_GREEN)
    records.append(QualityRecord(
        run_id="run-1", pipeline_class="TinyPipeline", image_index=6, arm="treatment", decision="reverted",
        reason="a 0.20 < 0.50", prompt=EVIL_PROMPT, p_before=0.6, a_before=0.2, p_after=0.5, a_after=0.25,
        guard="reverted: p+a fell", image_path="images/reverted_original.png",
        original_image_path="images/reverted_original.png", timings={"score": 0.2, "stage1": 1.0, "rescore": 0.2},
    ))
    records.append(QualityRecord(
        run_id="run-1", pipeline_class="TinyPipeline", image_index=7, arm="treatment", decision="failed",
        reason="p 0.10 < 0.50", prompt="a broken <i>thing</i>", p_before=0.1, a_before=0.7,
        error="stage 1 raised RuntimeError: out of memory", timings={"score": 0.2, "stage1": 0.1},
    ))
    return records


@pytest.fixture(params=["jsonl", "sqlite"])
def log_path(request, tmp_path) -> Path:
    path = tmp_path / f"quality.{request.param}"
    with QualityLog(path) as log:
        log.write_many(build_records(tmp_path))
    return path


def report_of(log_path: Path, **kwargs) -> tuple[str, Page]:
    out = write_report(log_path, log_path.parent / "report.html", **kwargs)
    text = out.read_text(encoding="utf-8")
    return text, Page(text)


def test_report_is_self_contained_and_matches_the_summary(log_path):
    text, page = report_of(log_path)
    urls = page.resource_urls()
    assert urls and all(url.startswith("data:image/jpeg;base64,") for url in urls)
    assert not re.search(r"https?:|url\(|@import|//[a-z]", text.replace("data:image/jpeg;base64,", ""))
    assert page.count("script") == page.count("link") == page.count("iframe") == 0
    with QualityLog(log_path) as log:
        summary = log.summary()
    rows = {row[0]: row for row in page.summary_rows}
    assert list(rows) == ["control", "treatment"]
    treatment = summary["treatment"]
    assert rows["treatment"][1] == str(treatment["count"]) == "6"
    assert rows["treatment"][8] == f"{100 * treatment['refine_rate']:.1f}%" == "83.3%"
    assert rows["treatment"][4] == f"{treatment['p_after_mean']:.3f}"
    assert rows["treatment"][-4:] == ["1", "3", "1", "1"]  # skipped, refined, reverted, failed
    assert rows["control"][8] == "0.0%" and rows["control"][9] == "–"
    assert page.count("article", "record-card") == REFINED_COUNT + REVERTED_COUNT
    assert page.count("circle", "point") == 2 * (REFINED_COUNT + REVERTED_COUNT)
    assert "out of memory" in text  # the failed record's error is listed


def test_thumbnails_are_downscaled_jpeg(log_path):
    _, page = report_of(log_path)
    for url in page.resource_urls():
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            assert image.format == "JPEG" and max(image.size) <= THUMBNAIL_SIZE


def test_prompt_html_is_escaped(log_path):
    text, page = report_of(log_path)
    assert "<script>" not in text and "<b>dog</b>" not in text and "<i>thing</i>" not in text
    assert "a cat &lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt; &amp; a &lt;b&gt;dog&lt;/b&gt;" in text
    assert page.count("script") == page.count("b") == page.count("i") == 0


def test_missing_or_unrecorded_maps_are_said_in_place(log_path):
    text, _ = report_of(log_path)
    assert f"image not found: {log_path.parent / 'images' / 'missing_A.png'}" in text
    assert text.count("no A overlay image recorded") == 2  # refined2 and the reverted record
    assert "mask overlay" in text  # a map beyond P and A is shown too


def test_thumbnails_are_capped_and_the_rest_counted(log_path):
    _, page = report_of(log_path, max_thumbnails=2)
    assert page.count("article", "record-card") == 2
    text, page = report_of(log_path, max_thumbnails=0)
    assert page.count("article", "record-card") == 0
    assert "4 more refined or reverted image(s) omitted" in text


def test_run_id_selects_one_run(log_path):
    text, page = report_of(log_path, run_id="run-2")
    assert [row[1] for row in page.summary_rows] == ["0", "1"]
    assert page.count("article", "record-card") == 1 and "run &#x27;run-2&#x27;" in text


@pytest.mark.parametrize("suffix", ["jsonl", "sqlite"])
def test_empty_log_gives_a_valid_report(tmp_path, suffix):
    path = tmp_path / f"empty.{suffix}"
    QualityLog(path).close()
    text, page = report_of(path)
    assert "The log holds no records at all." in text
    assert len(page.summary_rows) == 2 and all(row[1] == "0" for row in page.summary_rows)
    assert page.count("article", "record-card") == 0 and 'id="no-scatter"' in text


def test_torn_jsonl_lines_are_reported_not_fatal(tmp_path):
    path = tmp_path / "torn.jsonl"
    with QualityLog(path) as log:
        log.write_many(build_records(tmp_path)[:2])
    with open(path, "ab") as file:
        file.write(b'{"run_id": "half a rec')
    text, page = report_of(path)
    assert "1 unreadable line(s) of the log were skipped" in text and len(page.summary_rows) == 2


def test_cli_writes_the_report(log_path, capsys):
    out = log_path.parent / "cli.html"
    assert main(["report", str(log_path), "--out", str(out), "--max-thumbnails", "1"]) == 0
    assert Page(out.read_text(encoding="utf-8")).count("article", "record-card") == 1
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing log", "quality log does not exist"),
        ("out in a missing directory", "directory does not exist"),
        ("out is the log", "is the quality log itself"),
        ("garbage jsonl", "holds no readable record"),
        ("foreign jsonl", "unknown QualityRecord field"),
        ("garbage sqlite", "not a SQLite database"),
        ("unknown suffix", "cannot tell the quality log format"),
        ("negative cap", "max_thumbnails must be an integer >= 0"),
    ],
)
def test_cli_errors_exit_2_with_a_clear_message(tmp_path, capsys, case, message):
    log, out, extra = tmp_path / "quality.jsonl", tmp_path / "report.html", []
    if case == "out in a missing directory":
        QualityLog(log).close()
        out = tmp_path / "nowhere" / "report.html"
    elif case == "out is the log":
        QualityLog(log).close()
        out = log
    elif case == "garbage jsonl":
        log.write_bytes(b"\x00\xff not json at all\n}{\n")
    elif case == "foreign jsonl":
        log.write_text('{"hello": "world"}\n')
    elif case == "garbage sqlite":
        log = tmp_path / "quality.sqlite"
        log.write_bytes(b"this is no database" * 100)
    elif case == "unknown suffix":
        log = tmp_path / "quality.txt"
        log.write_text("")
    elif case == "negative cap":
        QualityLog(log).close()
        extra = ["--max-thumbnails", "-1"]
    before = log.read_bytes() if log.exists() else None
    assert main(["report", str(log), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert (log.read_bytes() if log.exists() else None) == before  # the log is never created or changed
    assert not (tmp_path / "report.html").exists()


def run_chromium(tmp_path: Path, name: str, *arguments: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"chromium {name} failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (Debian package 'chromium'); rendering is not checked"
)
def test_report_renders_in_headless_chromium(log_path, tmp_path):
    out = write_report(log_path, tmp_path / "rendered.html")
    url = out.resolve().as_uri()
    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, "shot", f"--screenshot={shot}", "--window-size=1280,1800", "--hide-scrollbars", url)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (1800, 1280)
    assert pixels.std() > 20, "the screenshot is (nearly) one colour"

    def near(colour: tuple[int, int, int], tolerance: int = 24) -> int:
        return int((np.abs(pixels - np.array(colour)).max(axis=-1) <= tolerance).sum())

    assert near(ORIGINAL_GREEN) > 5000, "the embedded original thumbnails did not render"
    # Four refined points and the legend's, about 50 pixels each.
    assert near((31, 111, 178)) > 150, "the refined points of the SVG plot did not render"

    dom = Page(run_chromium(tmp_path, "dom", "--dump-dom", url).stdout)
    assert [row[0] for row in dom.summary_rows] == ["control", "treatment"]
    assert dom.count("article", "record-card") == REFINED_COUNT + REVERTED_COUNT
    assert dom.count("script") == 0
