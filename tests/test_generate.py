"""``grefine generate``: the batch command end to end over the tiny offline models.

Most runs go through ``cli.main`` in this process; the kill test and the two-process test need
real processes. Every run writes into its own temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_hooks import QualityLog, RefinePolicy, wrap
from grefine_hooks.cli import main
from grefine_hooks.records import record_path, resolve_record_path
from grefine_hooks.testing import tiny_call_kwargs, tiny_pipeline

PROMPTS = [
    "a red book and a yellow vase on a wooden table",
    "a cat sleeping on a sofa",
    "a blue car parked by the sea",
    "two apples in a glass bowl",
    "a lighthouse at night",
    "a child flying a kite in a field",
]
# With this run id and ab_split 0.5, prompts 1 and 5 fall in the control arm, the rest in treatment.
RUN_ID = "generate-test"
BIN = Path(sys.executable).parent


def _prompts_file(directory: Path, prompts: list[str] = PROMPTS) -> Path:
    path = directory / "prompts.txt"
    lines = ["# a comment, then a blank line", ""]
    for prompt in prompts:
        lines += [prompt, "   "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--tiny", "--family", "sd15", "--prompts", str(prompts), "--out", str(out), *extra]


def _records(log: Path) -> list:
    with QualityLog(log) as opened:
        return opened.read()


def _files(out: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns for path in sorted(out.rglob("*.png"))}


def _key(record) -> tuple:
    return record.prompt, record.image_index


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """Six prompts, one image each, A/B split 0.5, one process: (out dir, stdout)."""
    directory = tmp_path_factory.mktemp("single")
    out = directory / "out"
    argv = _args(_prompts_file(directory), out, "--ab-split", "0.5", "--run-id", RUN_ID)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return out, stdout.getvalue(), argv


def test_generate_writes_images_maps_and_one_record_per_image(single_run):
    out, stdout, _ = single_run
    log = out / "quality.sqlite"
    records = _records(log)
    assert len(records) == 6 and len({_key(record) for record in records}) == 6
    assert {record.run_id for record in records} == {RUN_ID}
    assert {record.arm for record in records} == {"control", "treatment"}
    assert sorted(record.prompt for record in records if record.arm == "control") == sorted([PROMPTS[1], PROMPTS[5]])
    assert sorted(record.seed for record in records) == list(range(6))  # seed S + prompt index, S = 0
    for record in records:
        index = PROMPTS.index(record.prompt)
        assert record.image_path == f"images/{index:05d}_0.png"  # relative: inside the log's directory
        assert record.map_paths == {"P": f"maps/{index:05d}_0_P.png", "A": f"maps/{index:05d}_0_A.png"}
        for path in (record.image_path, *record.map_paths.values()):
            with Image.open(resolve_record_path(path, log)) as image:
                assert image.size == (64, 64)
        if record.decision in ("refined", "reverted"):
            assert resolve_record_path(record.original_image_path, log).is_file()
        else:
            assert record.original_image_path is None
    assert len(list((out / "images").glob("*.png"))) == 6 + sum(r.original_image_path is not None for r in records)
    assert "on 1 process(es)" in stdout and "0 already done" in stdout
    assert "control: 2 (skipped 2)" in stdout


def test_rerun_resumes_and_writes_nothing(single_run, capsys):
    out, _, argv = single_run
    before_records, before_files = _records(out / "quality.sqlite"), _files(out)
    assert main(argv) == 0
    assert "generated 0 prompt(s)" in capsys.readouterr().out
    after = _records(out / "quality.sqlite")
    assert [record.record_id for record in after] == [record.record_id for record in before_records]
    assert _files(out) == before_files


def test_killed_run_completes_on_rerun_without_duplicates(tmp_path):
    out, log = tmp_path / "out", tmp_path / "quality.jsonl"
    argv = _args(_prompts_file(tmp_path), out, "--log", str(log), "--ab-split", "0")  # scoring only: quick
    process = subprocess.Popen(
        [sys.executable, "-m", "grefine_hooks.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if log.exists() and log.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    logged = len(_records(log))
    assert 2 <= logged < 6, f"the kill should land midway, after {logged} of 6 records"

    assert main(argv) == 0
    records = _records(log)
    assert len(records) == 6 and len({_key(record) for record in records}) == 6
    assert all(resolve_record_path(record.image_path, log).is_file() for record in records)
    # The log sits beside out/, so the paths run through it.
    assert all(record.image_path.startswith("out/images/") for record in records)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_produce_the_records_of_one(single_run, tmp_path):
    _, _, argv = single_run
    out = tmp_path / "out"
    argv = [*argv[:argv.index("--out") + 1], str(out), *argv[argv.index("--out") + 2:]]
    # --multi_gpu selects accelerate's torchrun launcher, the one that starts several processes;
    # with --cpu it would start a single one. generate then runs on CPU with gloo.
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "grefine_hooks.cli", *argv,
    ]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # no accelerate config
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es) (process 0: 3, process 1: 3)" in result.stdout, result.stdout

    def digest(log: Path) -> list[tuple]:
        return sorted(
            (r.prompt, r.image_index, r.seed, r.arm, r.decision, r.p_before, r.a_before) for r in _records(log)
        )

    one, two = digest(single_run[0] / "quality.sqlite"), digest(out / "quality.sqlite")
    assert [row[:5] for row in one] == [row[:5] for row in two]
    assert np.allclose([row[5:] for row in one], [row[5:] for row in two], atol=1e-5, rtol=0)


def test_policy_file_and_ab_split_override(tmp_path, capsys):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"p_threshold": 1.0, "a_threshold": 1.0, "guard": False, "ab_split": 0.0}))
    log = tmp_path / "logs" / "quality.jsonl"
    log.parent.mkdir()
    argv = _args(
        _prompts_file(tmp_path, PROMPTS[:2]), tmp_path / "out", "--policy", str(policy), "--ab-split", "1.0",
        "--log", str(log), "--seed", "7",
    )
    assert main(argv) == 0
    records = _records(log)
    assert [(r.arm, r.decision, r.seed) for r in records] == [("treatment", "refined", 7), ("treatment", "refined", 8)]
    assert records[0].policy == {**RefinePolicy().to_dict(), "p_threshold": 1.0, "a_threshold": 1.0,
                                 "guard": False, "ab_split": 1.0}
    for record in records:
        # The log is outside out/: absolute paths.
        assert Path(record.image_path).is_absolute() and Path(record.original_image_path).is_absolute()
        final, original = np.asarray(Image.open(record.image_path)), np.asarray(Image.open(record.original_image_path))
        assert not np.array_equal(final, original)
    assert "treatment: 2 (refined 2)" in capsys.readouterr().out

    # Another seed would overwrite the images these records point at.
    assert main([*argv[:-1], "8"]) == 2
    assert "is the image of a record of run" in capsys.readouterr().err
    assert len(_records(log)) == 2


def test_another_family_with_several_images_per_prompt(tmp_path):
    out = tmp_path / "out"
    argv = [
        "generate", "--tiny", "--family", "pixart-sigma", "--prompts", str(_prompts_file(tmp_path, PROMPTS[:1])),
        "--out", str(out), "--images-per-prompt", "2", "--ab-split", "0",
    ]
    assert main(argv) == 0
    records = _records(out / "quality.sqlite")
    assert [(r.image_index, r.image_path, r.pipeline_class) for r in records] == [
        (0, "images/00000_0.png", "RefinedPixArtSigmaPipeline"),
        (1, "images/00000_1.png", "RefinedPixArtSigmaPipeline"),
    ]
    assert all(r.arm == "control" and set(r.map_paths) == {"P", "A"} for r in records)


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a database\n" * 100)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_prompts", "cannot read prompts file"),
        ("directory_prompts", "cannot read prompts file"),
        ("empty_prompts", "holds no prompt"),
        ("log_in_missing_directory", "does not exist"),
        ("log_under_a_file", "is not a directory"),
        ("corrupted_sqlite_log", "not a SQLite database or is corrupted"),
        ("bad_policy", "unknown RefinePolicy field"),
        ("bad_ab_split", "ab_split must be in [0, 1]"),
        ("no_model", "model is required"),
    ],
)
def test_bad_input_fails_before_generating(case, message, tmp_path, capsys):
    prompts, out, extra = _prompts_file(tmp_path), tmp_path / "out", []
    if case == "missing_prompts":
        prompts = tmp_path / "missing.txt"
    elif case == "directory_prompts":
        prompts = tmp_path
    elif case == "empty_prompts":
        prompts.write_text("# only a comment\n\n   \n", encoding="utf-8")
    elif case == "log_in_missing_directory":
        extra = ["--log", str(tmp_path / "nowhere" / "quality.sqlite")]
    elif case == "log_under_a_file":
        (tmp_path / "a-file").write_text("x")
        extra = ["--log", str(tmp_path / "a-file" / "quality.sqlite")]
    elif case == "corrupted_sqlite_log":
        extra = ["--log", str(_garbage(tmp_path / "quality.sqlite"))]
    elif case == "bad_policy":
        (tmp_path / "policy.json").write_text('{"p_treshold": 0.4}')
        extra = ["--policy", str(tmp_path / "policy.json")]
    elif case == "bad_ab_split":
        extra = ["--ab-split", "1.5"]
    argv = _args(prompts, out, *extra)
    if case == "no_model":
        argv.remove("--tiny")
    corrupted = tmp_path / "quality.sqlite"
    before = corrupted.read_bytes() if corrupted.exists() else None

    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("grefine generate: ") and message in error
    if "prompts" in case:
        assert str(prompts) in error
    if "log" in case:
        assert "quality.sqlite" in error
    assert not (out / "images").exists()
    if before is not None:
        assert corrupted.read_bytes() == before  # nothing logged before is lost


def test_pipeline_keeps_reports_and_generated_images_of_the_last_call(scorer, monkeypatch):
    calls = []
    monkeypatch.setattr(scorer, "score", lambda *a, _score=scorer.score, **k: calls.append(1) or _score(*a, **k))
    refine_all = RefinePolicy(p_threshold=1.0, a_threshold=1.0, guard=False)  # no re-score either
    pipe, plain = wrap(tiny_pipeline("sd15"), policy=refine_all, scorer=scorer), tiny_pipeline("sd15")
    arguments = {"num_images_per_prompt": 2, "output_type": "pt", **tiny_call_kwargs("sd15")}
    for pipeline in (pipe, plain):
        pipeline.set_progress_bar_config(disable=True)
    output = pipe("a cat", generator=torch.Generator().manual_seed(0), **arguments)
    expected = plain("a cat", generator=torch.Generator().manual_seed(0), **arguments)

    assert len(calls) == 1  # the reports are the gate's own, not a second scoring
    assert [report.p for report in pipe.last_reports] == [record.p_before for record in output.quality]
    assert all(report.P.shape == report.A.shape == (64, 64) for report in pipe.last_reports)
    assert [record.decision for record in output.quality] == ["refined", "refined"]
    assert torch.equal(pipe.last_generated, expected.images)  # the originals, as generated
    assert not torch.equal(pipe.last_generated, output.images)

    pipe("a cat", output_type="latent", **tiny_call_kwargs("sd15"))
    assert pipe.last_generated is None and pipe.last_reports == [None]


def test_record_paths_are_relative_inside_the_log_directory(tmp_path):
    log = tmp_path / "quality.sqlite"
    assert record_path(tmp_path / "images" / "a.png", log) == "images/a.png"
    assert record_path(tmp_path.parent / "b.png", log) == str((tmp_path.parent / "b.png").resolve())
    assert resolve_record_path("images/a.png", log) == tmp_path / "images" / "a.png"


def test_generate_logs_to_postgresql_with_absolute_paths_and_resumes(tmp_path, postgres_url, capsys):
    """``--log postgresql://...``: a server has no directory, so image paths are absolute; reruns resume."""
    argv = _args(_prompts_file(tmp_path, PROMPTS[:2]), tmp_path / "out", "--log", postgres_url, "--run-id", RUN_ID)
    assert main(argv) == 0
    records = _records(postgres_url)
    assert len(records) == 2 and not (tmp_path / "out" / "quality.sqlite").exists()
    for record in records:
        assert Path(record.image_path).is_absolute() and Path(record.image_path).is_file()
        assert all(Path(path).is_absolute() for path in record.map_paths.values())
    printed = capsys.readouterr().out
    assert "***" in printed and postgres_url.split(":")[2].split("@")[0] not in printed  # no password
    assert main(argv) == 0
    assert "generated 0 prompt(s)" in capsys.readouterr().out and len(_records(postgres_url)) == 2
    assert record_path(tmp_path / "a.png", None) == str((tmp_path / "a.png").resolve())
