"""``grefine evaluate``: does G-Refine help on this model? Generate, refine, score, tabulate.

For prompt ``i`` (seed ``S + i``) the job makes four images with one Refined pipeline: the base
image and the G-Refine result come from one call under the policy (the base is the image as
generated, `RefineMixin.last_generated`), always-refine is a second call with the gate and the
guard off, and best-of-2 keeps the base image or a second one (seed ``S + i + 1000000``,
scored but not refined), whichever the pipeline's own scorer rates higher by ``(p + a) / 2``.
Then the pipeline is freed and every image is scored by each metric in turn (one metric in
memory at a time), and the main process writes the table.

Layout of ``out`` (``i`` the prompt's index among the kept prompts, ``m`` a method)::

    images/{i:05d}_{m}.png    the image
    images/{i:05d}_{m}.json   its prompt, seed, seconds, decision, scorer p/a and metric scores
    metrics/{name}.json       a loaded metric's direction and kind
    run.json                  the settings the images were made with (a rerun must match them)
    evaluation.json, evaluation.txt, evaluation.html    the table

A rerun resumes: an image whose PNG and JSON exist is not generated again and a metric whose
scores are all there is not even loaded. Under ``accelerate launch`` the prompts are split
between the processes, for generation and for scoring alike.

>>> config = EvaluateConfig(out="eval", tiny=True, metrics=[my_metric])  # doctest: +SKIP
>>> with EvaluateJob(config) as job:                                       # doctest: +SKIP
...     table = job.run()
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import gather_object, tqdm
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ..generate import check_job_fields, load_job_pipeline, load_policy, process_device, read_prompts
from ..policy import RefinePolicy
from ..records import REFINE_DECISIONS
from .metrics import DEFAULT_METRICS, Metric, MetricLoadError, check_spec, load_metric
from .table import METHODS, EvaluationTable, MetricColumn, build_table, format_table

#: Best-of-2's second candidate for prompt ``i`` is drawn with seed ``S + i + SECOND_SEED_OFFSET``.
SECOND_SEED_OFFSET = 1_000_000


def default_prompts() -> Path:
    """The shipped prompt file (24 prompts; sources and licences in ``data/EVAL_PROMPTS_NOTICE.md``)."""
    return Path(str(resources.files("grefine_hooks") / "data" / "eval_prompts.txt"))


@dataclass
class EvaluateConfig:
    """What ``grefine evaluate`` runs; the fields are its command-line options.

    Args:
        out (`str` or `Path`): output directory, created when missing.
        prompts (`str` or `Path`, *optional*): one prompt per line, ``#`` lines skipped
            (default: `default_prompts`).
        model, family, tiny, steps, device, dtype, quality_prompts, clip, pretrained: the pipeline
            and its scorer, as for ``grefine generate`` (`load_refined_pipeline`).
        policy (`RefinePolicy`, `str` or `Path`, *optional*): G-Refine's policy, or a JSON file of
            one; its ``ab_split`` is set to 1 (every image may be refined).
        seed (`int`, defaults to `0`): prompt ``i`` is generated with ``seed + i``.
        metrics: built-in names, ``"module:function"`` paths or `Metric` objects
            (default: `DEFAULT_METRICS`, the paper's indicators).
        allow_downloads (`bool`, defaults to `False`): let metric libraries download weights.
        confidence (`float`, defaults to `0.95`), n_resamples (`int`, defaults to `9999`): the intervals.
    """

    out: str | Path
    prompts: str | Path | None = None
    family: str | None = None
    model: str | None = None
    tiny: bool = False
    policy: RefinePolicy | str | Path | None = None
    seed: int = 0
    steps: int | None = None
    device: str | None = None
    dtype: torch.dtype | None = None
    quality_prompts: str | None = None
    clip: str = "ViT-B-16"
    pretrained: str | None = "openai"
    metrics: Sequence[str | Metric] = field(default_factory=lambda: list(DEFAULT_METRICS))
    allow_downloads: bool = False
    confidence: float = 0.95
    n_resamples: int = 9999


class EvaluateJob:
    """One ``grefine evaluate`` run in this process: construction checks every input first."""

    def __init__(self, config: EvaluateConfig):
        check_job_fields(config, (("seed", 0), ("steps", 1), ("n_resamples", 1)))
        if config.model is not None and config.tiny:
            raise ValueError("give either model or tiny=True, not both")
        if isinstance(config.confidence, bool) or not isinstance(config.confidence, float) \
                or not 0.0 < config.confidence < 1.0:
            raise ValueError(f"confidence must be a number in (0, 1), got {config.confidence!r}")
        if not config.metrics:
            raise ValueError("metrics must name at least one metric")
        self.metric_names = [spec.name if isinstance(spec, Metric) else check_spec(spec) for spec in config.metrics]
        duplicates = sorted({name for name in self.metric_names if self.metric_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"metrics: {', '.join(duplicates)} given more than once")
        self.config = config
        self.prompts = read_prompts(config.prompts if config.prompts is not None else default_prompts())
        policy = config.policy if isinstance(config.policy, RefinePolicy) else load_policy(config.policy)
        self.policy = dataclasses.replace(policy, ab_split=1.0)
        self.always_policy = dataclasses.replace(self.policy, p_threshold=1.0, a_threshold=1.0, guard=False)
        self.out = Path(config.out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"out {str(self.out)!r} is a file, not a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "images").mkdir(exist_ok=True)
        (self.out / "metrics").mkdir(exist_ok=True)
        self.state, self.device = process_device(config.device)
        self._check_settings()
        self.images = {(index, method): self._read_image(index, method)
                       for index in range(len(self.prompts)) for method in METHODS}
        #: Prompts with an image still to make.
        self.pending = [index for index in range(len(self.prompts))
                        if any(self.images[index, method] is None for method in METHODS)]
        self.pipe: Any = None
        self.call_kwargs: dict[str, Any] = {}
        #: Metrics that could not load or failed while scoring: name -> reason.
        self.metric_errors: dict[str, str] = {}

    # -- generation ------------------------------------------------------------------------------

    def load(self) -> Any:
        """Builds the Refined pipeline and its scorer on this process's device; it logs nothing."""
        loaded = load_job_pipeline(self.config, self.device, self.policy)
        self.pipe, self.call_kwargs = loaded.pipe, loaded.call_kwargs
        return self.pipe

    def generate(self) -> int:
        """Makes this process's share of the missing images; returns how many prompts it worked on."""
        self.state.wait_for_everyone()
        with self.state.split_between_processes(self.pending) as share:
            if share and self.pipe is None:
                self.load()
            for index in tqdm(share, desc="grefine evaluate: images", unit="prompt"):
                self._generate(index)
        done = len(share)
        self.pipe = None  # free the pipeline before any metric loads
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.state.wait_for_everyone()
        self.images = {key: self._read_image(*key) for key in self.images}
        return done

    def _generate(self, index: int) -> None:
        missing = {method for method in METHODS if self.images[index, method] is None}
        seed = self.config.seed + index
        if missing & {"base", "g-refine", "best-of-2"}:
            output, seconds = self._call(index, seed, policy=self.policy)
            record = output.quality[0]
            timings = record.timings
            base = self._save(index, "base", self._generated(), seed, timings.get("generate", seconds),
                              scorer={"p": record.p_before, "a": record.a_before},
                              score_seconds=timings.get("score", 0.0))
            self._save(index, "g-refine", output.images[0], seed, seconds, decision=record.decision,
                       reason=record.reason, scorer=_final_scores(record))
        else:
            base = self.images[index, "base"]
        if "always-refine" in missing:
            output, seconds = self._call(index, seed, policy=self.always_policy)
            record = output.quality[0]
            self._save(index, "always-refine", output.images[0], seed, seconds, decision=record.decision,
                       reason=record.reason, scorer=_final_scores(record))
        if "best-of-2" in missing:
            second_seed = seed + SECOND_SEED_OFFSET
            output, seconds = self._call(index, second_seed, refine=False)
            record = output.quality[0]
            second = {"p": record.p_before, "a": record.a_before}
            picked_second = _quality(second) > _quality(base["scorer"])
            image = output.images[0] if picked_second else self._image(index, "base")
            cost = base["seconds"] + base.get("score_seconds", 0.0) + seconds
            self._save(index, "best-of-2", image, second_seed if picked_second else seed, cost,
                       scorer=second if picked_second else base["scorer"],
                       picked="second" if picked_second else "base", candidates={"base": base["scorer"], "second": second})

    def _call(self, index: int, seed: int, **scope: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        with self.pipe.refinement_scope(**scope):
            output = self.pipe(
                self.prompts[index], generator=torch.Generator(self.device).manual_seed(seed), **self.call_kwargs
            )
        return output, time.perf_counter() - start

    def _generated(self) -> Image.Image:
        """The last call's image as generated, before refinement."""
        return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(self.pipe.last_generated.float()))[0]

    # -- scoring ---------------------------------------------------------------------------------

    def score(self) -> None:
        """Scores this process's share of the images with every metric that lacks scores, one at a time."""
        self.state.wait_for_everyone()
        indices = list(range(len(self.prompts)))
        with self.state.split_between_processes(indices) as share:
            for spec, name in zip(self.config.metrics, self.metric_names):
                todo = [(index, method) for index in share for method in METHODS
                        if self.images[index, method] is not None
                        and name not in self.images[index, method]["scores"]]
                if not todo:
                    continue
                try:
                    metric = spec if isinstance(spec, Metric) else load_metric(
                        spec, self.device, allow_downloads=self.config.allow_downloads)
                except MetricLoadError as error:
                    self.metric_errors[name] = f"could not load: {error}"
                    continue
                _write_json(self.out / "metrics" / f"{_file_name(name)}.json",
                            {"name": name, "lower_better": metric.lower_better, "kind": metric.kind})
                self._score_with(metric, todo)
                del metric
                gc.collect()
        errors: dict[str, str] = {}
        for part in gather_object([self.metric_errors]):
            errors.update(part)
        self.metric_errors = errors
        self.state.wait_for_everyone()
        self.images = {key: self._read_image(*key) for key in self.images}

    def _score_with(self, metric: Metric, todo: list[tuple[int, str]]) -> None:
        bar = tqdm(total=len(todo), desc=f"grefine evaluate: {metric.name}", unit="image")
        for start in range(0, len(todo), metric.batch_size):
            batch = todo[start:start + metric.batch_size]
            try:
                values = metric.score([self._image(*key) for key in batch], [self.prompts[key[0]] for key in batch])
            except Exception as error:  # a metric's own failure: reported, the other metrics go on
                self.metric_errors[metric.name] = f"failed while scoring: {type(error).__name__}: {error}"
                break
            for key, value in zip(batch, values):
                entry = self.images[key]
                entry["scores"][metric.name] = value
                _write_json(self._json_file(*key), entry)
            bar.update(len(batch))
        bar.close()

    # -- the table -------------------------------------------------------------------------------

    def table(self) -> EvaluationTable:
        """The table of what is on disk (every process gets the same)."""
        columns = []
        for name in self.metric_names:
            error = self.metric_errors.get(name)
            meta = _read_json(self.out / "metrics" / f"{_file_name(name)}.json") or {}
            if error is None and not meta:
                error = "no scores on disk"
            columns.append(MetricColumn(name, bool(meta.get("lower_better", False)), meta.get("kind", "custom"), error))
        prompts = range(len(self.prompts))
        scores = {method: {column.name: [self._score_of(index, method, column.name) for index in prompts]
                           for column in columns} for method in METHODS}
        refine_rates = {method: _mean([bool(entry and entry.get("refined")) for entry in
                                       (self.images[index, method] for index in prompts)]) for method in METHODS}
        seconds = {method: [entry["seconds"] for index in prompts if (entry := self.images[index, method])]
                   for method in METHODS}
        table = build_table(scores, columns, refine_rates, seconds, confidence=self.config.confidence,
                            n_resamples=self.config.n_resamples, seed=self.config.seed)
        table.details = {"settings": self._settings(), "images": [
            {"prompt": self.prompts[index], "seed": self.config.seed + index,
             "methods": {method: self.images[index, method] for method in METHODS}} for index in prompts]}
        return table

    def write(self, table: EvaluationTable) -> dict[str, Path]:
        """Writes ``evaluation.json``, ``.txt`` and ``.html`` (main process only); returns their paths."""
        from ..report import render_evaluation_page

        paths = {suffix: self.out / f"evaluation.{suffix}" for suffix in ("json", "txt", "html")}
        if self.state.is_main_process:
            document = table.to_dict()
            _write_json(paths["json"], document)
            paths["txt"].write_text(format_table(table) + "\n", encoding="utf-8")
            paths["html"].write_text(render_evaluation_page(document), encoding="utf-8")
        return paths

    def run(self, echo: bool = True) -> EvaluationTable:
        """Generates what is missing, scores what is unscored, writes the table (and prints it if ``echo``)."""
        self.generate()
        self.score()
        table = self.table()
        paths = self.write(table)
        if echo:
            self.state.print(format_table(table))
            self.state.print(f"wrote {paths['txt']}, {paths['json'].name} and {paths['html'].name}")
        return table

    def close(self) -> None:
        self.pipe = None

    def __enter__(self) -> EvaluateJob:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- files -----------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        config = self.config
        return {
            "model": config.model if config.model is not None else f"tiny-{config.family or 'sd15'}",
            "family": config.family, "steps": config.steps, "seed": config.seed,
            "dtype": None if config.dtype is None else str(config.dtype).removeprefix("torch."),
            "policy": self.policy.to_dict(), "quality_prompts": config.quality_prompts,
            "clip": None if config.tiny else config.clip, "pretrained": None if config.tiny else config.pretrained,
            "second_seed_offset": SECOND_SEED_OFFSET,
        }

    def _check_settings(self) -> None:
        """Refuses to mix images made with other settings into this directory."""
        path = self.out / "run.json"
        settings = self._settings()
        saved = _read_json(path)
        if saved is not None:
            changed = sorted(key for key in settings.keys() | saved.keys() if settings.get(key) != saved.get(key))
            if changed:
                raise ValueError(
                    f"out {str(self.out)!r} holds images made with other settings ({', '.join(changed)} "
                    "differ): use another out directory"
                )
        elif self.state.is_main_process:
            _write_json(path, settings)

    def _png_file(self, index: int, method: str) -> Path:
        return self.out / "images" / f"{index:05d}_{method}.png"

    def _json_file(self, index: int, method: str) -> Path:
        return self.out / "images" / f"{index:05d}_{method}.json"

    def _read_image(self, index: int, method: str) -> dict[str, Any] | None:
        """An image's entry when its PNG and JSON exist; a JSON of another prompt is an error."""
        entry = _read_json(self._json_file(index, method))
        if entry is None or not self._png_file(index, method).is_file():
            return None
        if entry.get("prompt") != self.prompts[index]:
            raise ValueError(
                f"{self._json_file(index, method)} is of prompt {entry.get('prompt')!r}, not {self.prompts[index]!r}: "
                "the prompts file changed; use another out directory"
            )
        return entry

    def _image(self, index: int, method: str) -> Image.Image:
        with Image.open(self._png_file(index, method)) as image:
            return image.convert("RGB")

    def _score_of(self, index: int, method: str, name: str) -> float | None:
        entry = self.images[index, method]
        return None if entry is None else entry["scores"].get(name)

    def _save(self, index: int, method: str, image: Image.Image, seed: int, seconds: float, *,
              decision: str | None = None, **extra: Any) -> dict[str, Any]:
        """Writes the PNG, then its JSON (so a JSON never names a missing image); returns the entry."""
        image.save(self._png_file(index, method))
        entry = {
            "prompt": self.prompts[index], "index": index, "method": method, "seed": seed,
            "image": self._png_file(index, method).name, "seconds": seconds, "decision": decision,
            "refined": decision in REFINE_DECISIONS, **extra, "scores": {},
        }
        _write_json(self._json_file(index, method), entry)
        self.images[index, method] = entry
        return entry


def _quality(scores: dict[str, float | None]) -> float:
    """What best-of-2 ranks by: the mean of the scorer's p and a (p alone when a was not scored)."""
    values = [value for value in (scores.get("p"), scores.get("a")) if value is not None]
    return sum(values) / len(values) if values else float("-inf")


def _final_scores(record: Any) -> dict[str, float | None]:
    """The scorer's p and a of the image a call returned: after refinement when it ran, else as generated."""
    refined = record.decision == "refined"
    return {"p": record.p_after if refined else record.p_before, "a": record.a_after if refined else record.a_before}


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _file_name(name: str) -> str:
    return name.replace(":", "__")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def _write_json(path: Path, value: Any) -> None:
    """Writes atomically: a run killed mid-write leaves the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
