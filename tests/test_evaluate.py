"""``grefine evaluate``: the quality-gain table over the tiny offline pipelines.

The paper's metrics need real weights, which do not exist here: the end-to-end runs score with
stand-ins built on real parts instead (the tiny CLIP's own image-text cosine, as CLIPScore
computes it, and pixel brightness in both directions), and the real metrics are checked under
the ``slow`` marker, each skipped with the reason it could not load.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grefine_hooks import RefinedStableDiffusionPipeline
from grefine_hooks.cli import main
from grefine_hooks.evaluate import (
    BUILTIN_METRICS, METHODS, EvaluateConfig, EvaluateJob, Metric, MetricColumn, MetricLoadError, build_table,
    format_table, load_metric,
)
from grefine_hooks.report import evaluation_section
from grefine_hooks.testing import tiny_clip
from serving import free_port

PROMPTS = ["a red book and a yellow vase", "two cats on a sofa"]
MISSING = "grefine_no_such_module:score"
BIN = Path(sys.executable).parent


def _tiny_clipscore() -> Metric:
    """CLIPScore's formula (cosine of image and text embeddings) on the tiny random CLIP."""
    model, preprocess, tokenizer = tiny_clip(seed=0)

    def score(images, prompts):
        with torch.no_grad():
            image = model.encode_image(torch.stack([preprocess(im) for im in images]))
            text = model.encode_text(tokenizer(list(prompts)))
        return torch.nn.functional.cosine_similarity(image, text, dim=-1)

    return Metric("tiny-clipscore", score, kind="alignment")


def _brightness(images, prompts):
    return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0) for image in images]


def _darkness(images, prompts):
    return [1.0 - value for value in _brightness(images, prompts)]


class _Counter:
    """Counts calls of the Refined pipeline and of the metric functions (a rerun must make none)."""

    def __init__(self) -> None:
        self.pipeline = 0
        self.metric = 0

    def metrics(self) -> list:
        clipscore = _tiny_clipscore()

        def counted(fn):
            def wrapper(images, prompts):
                self.metric += len(images)
                return fn(images, prompts)
            return wrapper

        return [
            Metric(clipscore.name, counted(clipscore.fn), kind="alignment"),
            Metric("brightness", counted(_brightness)),
            Metric("darkness", counted(_darkness), lower_better=True),
            "musiq",   # a built-in metric: pyiqa or its weights are not here
            MISSING,   # an import path that does not import
        ]


@contextlib.contextmanager
def _counting_pipeline(counter: _Counter):
    original = RefinedStableDiffusionPipeline.__call__

    def counted(self, *args, **kwargs):
        counter.pipeline += 1
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RefinedStableDiffusionPipeline, "__call__", counted)
        yield


def _run(out: Path, prompts: Path, counter: _Counter):
    config = EvaluateConfig(out=out, prompts=prompts, tiny=True, metrics=counter.metrics(), n_resamples=200)
    with _counting_pipeline(counter), EvaluateJob(config) as job:
        table = job.run(echo=False)
    return table


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation of two prompts: (out dir, prompts file, table, counter)."""
    directory = tmp_path_factory.mktemp("evaluate")
    prompts = directory / "prompts.txt"
    prompts.write_text("# two prompts\n" + "\n".join(PROMPTS) + "\n", encoding="utf-8")
    counter = _Counter()
    table = _run(directory / "out", prompts, counter)
    return directory / "out", prompts, table, counter


def _entry(out: Path, index: int, method: str) -> dict:
    return json.loads((out / "images" / f"{index:05d}_{method}.json").read_text(encoding="utf-8"))


def test_table_has_every_method_and_metric(evaluated):
    out, _, table, counter = evaluated
    assert counter.pipeline == 3 * len(PROMPTS)  # policy call (base + G-Refine), always-refine, second candidate
    assert list(table.rows) == list(METHODS)
    loaded = ["tiny-clipscore", "brightness", "darkness"]
    assert [metric.name for metric in table.loaded] == loaded
    for row in table.rows.values():
        assert set(row.cells) == set(loaded)
        for cell in row.cells.values():
            assert cell.n == len(PROMPTS) and cell.mean is not None and np.isfinite(cell.mean)
        assert row.images == len(PROMPTS) and row.seconds_per_image > 0
    for method in METHODS[1:]:
        for name in loaded:
            cell = table.rows[method].cells[name]
            expected = np.mean([_entry(out, i, method)["scores"][name] - _entry(out, i, "base")["scores"][name]
                                for i in range(len(PROMPTS))])
            assert cell.change == pytest.approx(expected)
            assert cell.low is None  # two prompts: too few for an interval
    # The tiny random CLIP rates every image below 0.5, so the policy refines all of them.
    assert table.rows["g-refine"].refine_rate == 1.0 and table.rows["always-refine"].refine_rate == 1.0
    assert table.rows["base"].refine_rate == 0.0 and table.rows["best-of-2"].refine_rate == 0.0
    # lower_better is respected: darkness mirrors brightness, so their "worse" shares agree.
    for method in METHODS[1:]:
        cells = table.rows[method].cells
        assert cells["darkness"].change == pytest.approx(-cells["brightness"].change)
        assert cells["darkness"].worse_share == cells["brightness"].worse_share
    document = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert list(document["methods"]) == list(METHODS)
    assert [metric["name"] for metric in document["metrics"]] == [*loaded, "musiq", MISSING]
    assert len(document["images"]) == len(PROMPTS)
    text = (out / "evaluation.txt").read_text(encoding="utf-8")
    page = (out / "evaluation.html").read_text(encoding="utf-8")
    for name in (*METHODS, *loaded):
        assert name in text and name in page
    assert page.count('<tr data-method="') == 2 * len(METHODS)


def test_best_of_2_never_scores_below_the_base_on_the_scorer_that_picked_it(evaluated):
    out, _, _, _ = evaluated
    for index in range(len(PROMPTS)):
        base, best = _entry(out, index, "base"), _entry(out, index, "best-of-2")
        candidates = best["candidates"]
        assert candidates["base"] == base["scorer"]
        quality = {name: (scores["p"] + scores["a"]) / 2 for name, scores in candidates.items()}
        assert quality[best["picked"]] == max(quality.values())
        assert (best["scorer"]["p"] + best["scorer"]["a"]) / 2 >= (base["scorer"]["p"] + base["scorer"]["a"]) / 2
        image = np.asarray(Image.open(out / "images" / f"{index:05d}_best-of-2.png"))
        base_image = np.asarray(Image.open(out / "images" / f"{index:05d}_base.png"))
        assert np.array_equal(image, base_image) == (best["picked"] == "base")
        assert best["seconds"] > base["seconds"]  # it paid for a second generation


def test_missing_metrics_are_reported_not_dropped(evaluated):
    out, _, table, _ = evaluated
    errors = {metric.name: metric.error for metric in table.metrics if metric.error is not None}
    assert set(errors) == {"musiq", MISSING}
    assert "could not load" in errors["musiq"]
    assert "grefine_no_such_module" in errors[MISSING]
    text = format_table(table)
    assert f"musiq: NOT SCORED: {errors['musiq']}" in text
    page = (out / "evaluation.html").read_text(encoding="utf-8")
    assert 'id="evaluation-missing"' in page and f'data-metric="{MISSING}"' in page


def test_rerun_computes_nothing_new_and_redoes_only_what_is_missing(evaluated):
    out, prompts, table, _ = evaluated
    counter = _Counter()
    again = _run(out, prompts, counter)
    assert (counter.pipeline, counter.metric) == (0, 0)
    for method in METHODS:
        for name, cell in table.rows[method].cells.items():
            assert again.rows[method].cells[name] == cell
    # One image gone: only the call that makes it runs again, and only its scores are computed.
    (out / "images" / "00001_always-refine.png").unlink()
    counter = _Counter()
    redone = _run(out, prompts, counter)
    assert counter.pipeline == 1
    assert counter.metric == 3  # one image, three loaded metrics
    assert redone.rows["always-refine"].cells["brightness"].mean == pytest.approx(
        table.rows["always-refine"].cells["brightness"].mean)  # same seed, same image


def test_cli_adds_a_module_function_metric_to_an_existing_run(evaluated, tmp_path, monkeypatch, capsys):
    out = shutil.copytree(evaluated[0], tmp_path / "out")
    prompts = evaluated[1]
    (tmp_path / "grefine_test_metric.py").write_text(
        "import numpy as np\n"
        "def redness(images, prompts):\n"
        "    return [float(np.asarray(im.convert('RGB'))[..., 0].mean()) / 255 for im in images]\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    counter = _Counter()
    argv = ["evaluate", "--tiny", "--prompts", str(prompts), "--out", str(out), "--resamples", "200",
            "--metric", "grefine_test_metric:redness", "--json"]
    with _counting_pipeline(counter):
        assert main(argv) == 0
    assert counter.pipeline == 0  # the images are there; only the new metric runs
    document = json.loads(capsys.readouterr().out)
    assert [metric["name"] for metric in document["metrics"]] == ["grefine_test_metric:redness"]
    assert document["methods"]["base"]["cells"]["grefine_test_metric:redness"]["mean"] > 0
    assert _entry(out, 0, "g-refine")["scores"]["grefine_test_metric:redness"] >= 0


def test_negative_optimisation_count_on_a_constructed_case():
    metrics = [MetricColumn("up", kind="perception"), MetricColumn("brisque-like", lower_better=True),
               MetricColumn("align"), MetricColumn("gone", error="could not load: no weights")]
    base = {"up": [1.0, 2.0, 3.0], "brisque-like": [10.0, 20.0, 30.0], "align": [0.5, 0.5, 0.5]}
    scores = {
        "base": base,
        # up rises on the mean but falls on image 2; brisque-like rises (worse) on images 0 and 1;
        # align is unchanged: equal is not worse.
        "g-refine": {"up": [2.0, 2.5, 2.0], "brisque-like": [11.0, 21.0, 29.0], "align": [0.5, 0.5, 0.5]},
        # everything better
        "best-of-2": {"up": [1.5, 2.5, 3.5], "brisque-like": [9.0, 19.0, 29.0], "align": [0.6, 0.6, 0.6]},
    }
    table = build_table(scores, metrics, {"g-refine": 2 / 3}, {"base": [1.0, 1.0, 1.0], "g-refine": [2.0, 4.0, 3.0]})
    assert list(table.rows) == ["base", "g-refine", "best-of-2"]
    refined = table.rows["g-refine"]
    assert refined.cells["up"].change == pytest.approx(0.5 / 3)  # +1, +0.5, -1
    assert refined.cells["brisque-like"].change == pytest.approx(1.0 / 3)  # +1, +1, -1
    assert refined.negatives_on_mean == 1            # brisque-like only: its mean rose
    assert refined.negatives_per_image == pytest.approx((1 + 1 + 1) / 3)  # [brisque], [brisque], [up]
    assert refined.cells["up"].worse_share == pytest.approx(1 / 3)
    assert refined.cells["align"].worse_share == 0.0
    assert refined.refine_rate == pytest.approx(2 / 3) and refined.seconds_per_image == pytest.approx(3.0)
    best = table.rows["best-of-2"]
    assert (best.negatives_on_mean, best.negatives_per_image) == (0, 0.0)
    assert "gone" not in refined.cells and "gone: NOT SCORED: could not load: no weights" in format_table(table)
    assert 'data-metric="gone"' in evaluation_section(table.to_dict())


def test_intervals_and_significant_negatives():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.1, 40)
    metrics = [MetricColumn("a"), MetricColumn("b")]
    scores = {"base": {"a": base, "b": base},
              "g-refine": {"a": base - 0.2 + rng.normal(0, 0.01, 40), "b": base - 0.001 + rng.normal(0, 0.2, 40)}}
    row = build_table(scores, metrics, {}, {}, n_resamples=999).rows["g-refine"]
    low, high = row.cells["a"].low, row.cells["a"].high
    assert low < row.cells["a"].change < high < 0
    assert row.negatives_on_mean == 2 and row.negatives_significant == 1  # b's interval spans zero
    constant = build_table({"base": {"a": [0.0] * 12}, "g-refine": {"a": [0.1] * 12}}, [MetricColumn("a")], {}, {})
    assert (constant.rows["g-refine"].cells["a"].low, constant.rows["g-refine"].cells["a"].high) == (0.1, 0.1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--resamples", "0"], "n_resamples must be an integer >= 1"),
        (["--metric", "bogus"], "unknown metric 'bogus'"),
        (["--metric", "brightness:x", "--metric", "brightness:x"], "brightness:x given more than once"),
        (["--prompts", "/nonexistent/prompts.txt"], "cannot read prompts file '/nonexistent/prompts.txt'"),
        (["--policy", "/nonexistent/policy.json"], "cannot read policy file"),
        (["--model", "some/model"], "give either model or tiny=True"),
    ],
)
def test_bad_arguments_fail_before_any_model_loads(extra, message, tmp_path, capsys):
    counter = _Counter()
    with _counting_pipeline(counter):
        code = main(["evaluate", "--tiny", "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert counter.pipeline == 0


def test_model_or_tiny_is_required_and_settings_must_match(evaluated, tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path / "out")]) == 2
    assert "model is required" in capsys.readouterr().err
    out, prompts, _, _ = evaluated
    assert main(["evaluate", "--tiny", "--prompts", str(prompts), "--out", str(out), "--seed", "3"]) == 2
    assert "other settings (seed differ)" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("a lighthouse\n" + PROMPTS[1] + "\n", encoding="utf-8")
    assert main(["evaluate", "--tiny", "--prompts", str(other), "--out", str(out)]) == 2
    assert "the prompts file changed" in capsys.readouterr().err


def test_bad_metric_output_is_an_error_naming_the_metric():
    metric = Metric("short", lambda images, prompts: [1.0])
    with pytest.raises(ValueError, match="metric 'short' returned 1 score"):
        metric.score([Image.new("RGB", (8, 8))] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="metric name"):
        Metric("a/b", _brightness)
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        load_metric("nope")


def test_two_processes_split_the_prompts(tmp_path):
    """``accelerate launch`` with two CPU processes makes the same images as one process would."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (tmp_path / "grefine_test_metric.py").write_text(
        "import numpy as np\n"
        "def brightness(images, prompts):\n"
        "    return [float(np.asarray(im.convert('L')).mean()) for im in images]\n",
        encoding="utf-8",
    )
    command = [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "grefine_hooks.cli", "evaluate", "--tiny",
        "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--device", "cpu", "--resamples", "100",
        "--metric", "grefine_test_metric:brightness",
    ]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((tmp_path / "out" / "evaluation.json").read_text(encoding="utf-8"))
    assert [image["prompt"] for image in document["images"]] == PROMPTS
    for image in document["images"]:
        assert set(image["methods"]) == set(METHODS)
        assert all(entry["scores"]["grefine_test_metric:brightness"] > 0 for entry in image["methods"].values())


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_METRICS)
def test_real_metric_scores_a_picture(name):
    """The paper's metrics from the user's caches (no download): skipped, with the reason, when absent."""
    try:
        metric = load_metric(name)
    except MetricLoadError as error:
        pytest.skip(f"{name} cannot load here: {error}")
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    image = Image.fromarray(np.stack([gradient, gradient.T, 255 - gradient], axis=-1))
    scores = metric.score([image, image.rotate(90)], ["a colourful gradient", "a colourful gradient"])
    assert len(scores) == 2 and all(np.isfinite(scores))
    assert metric.lower_better == (name == "brisque")


def test_report_adds_the_evaluation_section(evaluated, tmp_path, capsys):
    from grefine_hooks import QualityLog

    log = tmp_path / "quality.sqlite"
    QualityLog(log).close()
    page = tmp_path / "report.html"
    evaluation = evaluated[0] / "evaluation.json"
    assert main(["report", str(log), "--out", str(page), "--evaluation", str(evaluation)]) == 0
    html = page.read_text(encoding="utf-8")
    assert 'id="evaluation"' in html and 'data-method="always-refine"' in html
    assert main(["report", str(log), "--out", str(page), "--evaluation", str(tmp_path / "none.json")]) == 2
    assert "cannot read --evaluation" in capsys.readouterr().err


def test_shipped_prompts_and_load_metrics():
    from grefine_hooks.evaluate import default_prompts, load_metrics
    from grefine_hooks.generate import read_prompts

    prompts = read_prompts(default_prompts())
    assert len(prompts) == 24 and len(set(prompts)) == 24
    assert any(len(prompt.split()) > 25 for prompt in prompts)  # long descriptions among them
    assert "EVAL_PROMPTS_NOTICE.md" in default_prompts().read_text(encoding="utf-8")
    brightness = Metric("brightness", _brightness)
    loaded, failed = load_metrics([brightness, MISSING])
    assert loaded == [brightness] and list(failed) == [MISSING]
    with pytest.raises(ValueError, match="given twice"):
        load_metrics([brightness, Metric("brightness", _darkness)])
