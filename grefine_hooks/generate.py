"""``grefine generate``: a file of prompts in, images, map overlays and one quality record per image out.

A batch job over the Refined pipelines: every image is scored, refined when the policy says so and
saved with heat-map overlays of its ``P`` and ``A`` maps (and its original, when refinement ran);
its `QualityRecord` goes to the A/B quality log only after its files are on disk, so a record
never points at an image that was not written. A rerun resumes: prompts whose images and records
exist are skipped. Under ``accelerate launch`` the prompts are split between the processes, which
all append to the one log.

Layout of ``out`` (prompt index ``i`` among the kept prompts, image ``k`` of that prompt)::

    images/{i:05d}_{k}.png            the image the pipeline returned
    images/{i:05d}_{k}_original.png   the image as generated, when refinement ran (refined or reverted)
    maps/{i:05d}_{k}_P.png, _A.png    the P and A maps over the generated image, when it was scored
    quality.sqlite                    the log, unless ``log`` says elsewhere

Paths in the records (``image_path``, ``original_image_path``, ``map_paths``) are relative to the
log file's directory when inside it, else absolute: see `record_path` and `resolve_record_path`.

>>> config = GenerateConfig(family="sd15", prompts="prompts.txt", out="out", tiny=True)
>>> with GenerateJob(config) as job:  # doctest: +SKIP
...     job.load()
...     summary = job.run()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, tqdm
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from .loading import REFINED_PIPELINES, LoadedPipeline, load_refined_pipeline
from .policy import RefinePolicy
from .records import ARMS, DECISIONS, QualityLog, QualityRecord, record_path, resolve_record_path
from .visualize import overlay

#: Decisions in which the generated image was refined, so its original is saved beside it.
ORIGINAL_SAVED_DECISIONS = ("refined", "reverted")


@dataclass
class GenerateConfig:
    """What ``grefine generate`` runs; every field is a command-line option of the same name.

    Args:
        family (`str`, *optional*): one of `REFINED_PIPELINES` (``"sd15"``, ``"sdxl"``, ...); read
            from the model's ``model_index.json`` when None (``"sd15"`` with ``tiny``).
        prompts (`str` or `Path`): UTF-8 text, one prompt per line; blank lines and lines starting
            with ``#`` are skipped. A prompt's index is its position among the kept prompts.
        out (`str` or `Path`): the output directory, created when missing.
        model (`str`, *optional*): hub id or folder for ``from_pretrained``; required unless ``tiny``.
        tiny (`bool`, defaults to `False`): the offline tiny random-weight pipeline and CLIP of
            `grefine_hooks.testing` instead of real weights (meaningless pictures, same code paths).
        policy (`str` or `Path`, *optional*): a JSON object for `RefinePolicy.from_dict`.
        log (`str` or `Path`, *optional*): the quality log (``.jsonl``, ``.sqlite`` or a
            ``postgresql://`` URL); defaults to ``out/quality.sqlite``. A file's directory must exist.
            Image paths in a database's records are absolute.
        ab_split (`float`, *optional*): overrides the policy's ``ab_split``.
        images_per_prompt (`int`, defaults to `1`), seed (`int`, defaults to `0`): prompt ``i`` is
            generated with ``seed + i``, so an image does not depend on how prompts are split
            between processes or runs.
        steps (`int`, *optional*): ``num_inference_steps``; None keeps the pipeline's default
            (two for ``tiny``).
        device (`str`, *optional*): defaults to the process's accelerate device.
        dtype (`torch.dtype`, *optional*): defaults to float16 on CUDA, else float32.
        quality_prompts (`str`, *optional*): the scorer's PQ prompts, see `QualityScorer`.
        clip (`str`, defaults to `"ViT-B-16"`), pretrained (`str`, defaults to `"openai"`): the
            scorer's open_clip model (``local-dir:FOLDER`` for a saved one) and weights.
        run_id (`str`, *optional*): defaults to `default_run_id` of ``out``, so a rerun resumes
            the same run and keeps every image in the same A/B arm.
    """

    prompts: str | Path
    out: str | Path
    family: str | None = None
    model: str | None = None
    tiny: bool = False
    policy: str | Path | None = None
    log: str | Path | None = None
    ab_split: float | None = None
    images_per_prompt: int = 1
    seed: int = 0
    steps: int | None = None
    device: str | None = None
    dtype: torch.dtype | None = None
    quality_prompts: str | None = None
    clip: str = "ViT-B-16"
    pretrained: str | None = "openai"
    run_id: str | None = None


@dataclass
class GenerateSummary:
    """What a run did, the same on every process.

    Attributes:
        run_id (`str`), log (`Path`, or `str` for a database): where the records are (a URL without its password).
        processes (`int`): processes that shared the prompts.
        generated (`list[int]`): prompts generated by each process, in process order.
        skipped (`int`): prompts skipped because their images and records already existed.
        arms (`dict[str, dict]`): ``QualityLog.summary(run_id)`` after the run, earlier runs included.
    """

    run_id: str
    log: Path | str
    processes: int
    generated: list[int]
    skipped: int
    arms: dict[str, dict[str, Any]]

    def __str__(self) -> str:
        per_process = ", ".join(f"process {rank}: {count}" for rank, count in enumerate(self.generated))
        lines = [
            f"generated {sum(self.generated)} prompt(s) on {self.processes} process(es) ({per_process}); "
            f"{self.skipped} already done",
            f"run {self.run_id}: {sum(arm['count'] for arm in self.arms.values())} record(s) in {self.log}",
        ]
        for name in ARMS:
            decisions = self.arms[name]["decisions"]
            counts = ", ".join(f"{decision} {decisions[decision]}" for decision in DECISIONS if decisions[decision])
            lines.append(f"  {name}: {self.arms[name]['count']}" + (f" ({counts})" if counts else ""))
        return "\n".join(lines)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompts file: one per line, blank lines and ``#`` comments skipped.

    Raises:
        ValueError: naming the file, when it cannot be read, is not UTF-8 or holds no prompt.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompts file {str(path)!r}: {error}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [prompt for prompt in prompts if prompt and not prompt.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt (blank lines and '#' lines are skipped)")
    return prompts


def load_policy(path: str | Path | None, ab_split: float | None = None) -> RefinePolicy:
    """The policy of a JSON file (default ``RefinePolicy()`` without one), ``ab_split`` overriding its own."""
    policy = RefinePolicy()
    if path is not None:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"cannot read policy file {str(path)!r}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"policy file {str(path)!r} must hold a JSON object, got {type(values).__name__}")
        try:
            policy = RefinePolicy.from_dict(values)
        except ValueError as error:
            raise ValueError(f"policy file {str(path)!r}: {error}") from None
    if ab_split is not None:
        policy = dataclasses.replace(policy, ab_split=ab_split)
    return policy


def default_run_id(out: str | Path) -> str:
    """A run id fixed by the resolved output directory: reruns into it resume the same run.

    Moving the directory changes it; pass ``run_id`` to keep a run's A/B arms across a move.
    """
    resolved = Path(out).resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8")).hexdigest()[:12]
    return f"{resolved.name or 'out'}-{digest}"


def check_job_fields(config: Any, whole_numbers: Sequence[tuple[str, int]]) -> None:
    """The checks a batch job's config needs before any model loads: where the pipeline comes
    from (``family``, ``model`` / ``tiny``) and each of ``whole_numbers`` (name, minimum)."""
    if config.family is not None and config.family not in REFINED_PIPELINES:
        raise ValueError(f"family must be one of {sorted(REFINED_PIPELINES)}, got {config.family!r}")
    if config.model is None and not config.tiny:
        raise ValueError("model is required (a hub id or a folder) unless tiny=True")
    for name, minimum in whole_numbers:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def process_device(requested: str | None) -> tuple[PartialState, torch.device]:
    """This process's accelerate state and the device it runs on (``requested`` or accelerate's)."""
    # PartialState only sets up a multi-process CPU run (gloo) when told ``cpu=True``.
    use_cpu = requested is not None and torch.device(requested).type == "cpu"
    state = PartialState(cpu=use_cpu or not torch.accelerator.is_available())
    device = torch.device(requested) if requested is not None else state.device
    # "cpu:0" and "cpu" are one device; keep one spelling so device comparisons hold.
    return state, torch.device("cpu") if device.type == "cpu" else device


def load_job_pipeline(config: Any, device: torch.device, policy: RefinePolicy) -> LoadedPipeline:
    """The Refined pipeline and scorer a batch job's config names, on ``device``, without a progress bar
    of its own (the job shows one over its prompts)."""
    loaded = load_refined_pipeline(
        config.model, family=config.family, tiny=config.tiny, device=device, dtype=config.dtype,
        policy=policy, quality_prompts=config.quality_prompts, clip=config.clip,
        pretrained=config.pretrained, steps=config.steps,
    )
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded


class GenerateJob:
    """One ``grefine generate`` run in this process.

    Construction checks every input and opens the log, so bad input fails before any model is
    loaded; `load` builds the scorer and the pipeline; `run` generates this process's share.
    """

    def __init__(self, config: GenerateConfig):
        check_job_fields(config, (("images_per_prompt", 1), ("seed", 0), ("steps", 1)))
        if config.run_id is not None and not config.run_id.strip():
            raise ValueError("run_id must not be empty")
        self.config = config
        self.prompts = read_prompts(config.prompts)
        self.policy = load_policy(config.policy, config.ab_split)
        self.out = Path(config.out)
        self.run_id = config.run_id or default_run_id(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = QualityLog(config.log if config.log is not None else self.out / "quality.sqlite")
        # Read before any process writes (`run` waits for every process first), so that all
        # processes agree on what is left to do.
        logged = self.log.read()
        self._logged = {(r.prompt, r.seed, r.image_index): r for r in logged if r.run_id == self.run_id}
        #: Indices of the prompts to generate: not every image has a record whose image file exists.
        self.pending = [index for index in range(len(self.prompts)) if not self._done(index)]
        self._check_no_overwrite(logged)
        self.state, self.device = process_device(config.device)
        self.pipe: DiffusionPipeline | None = None
        self.call_kwargs: dict[str, Any] = {}

    def load(self) -> DiffusionPipeline:
        """Builds the scorer and the Refined pipeline on this process's device (`load_refined_pipeline`).

        The pipeline logs nothing itself: `run` writes each record once its files are saved.
        """
        loaded = load_job_pipeline(self.config, self.device, self.policy)
        pipe, self.call_kwargs = loaded.pipe, loaded.call_kwargs
        pipe.run_id = self.run_id
        self.pipe = pipe
        return pipe

    def run(self) -> GenerateSummary:
        """Generates this process's share of the pending prompts; the main process prints the summary.

        Loads the models first if `load` was not called and this process has work.
        """
        self.state.wait_for_everyone()  # every process has read the log: writing may start
        with self.state.split_between_processes(self.pending) as share:
            if share and self.pipe is None:
                self.load()
            for index in tqdm(share, desc="grefine generate", unit="prompt"):
                self._generate(index)
        self.state.wait_for_everyone()
        summary = GenerateSummary(
            run_id=self.run_id,
            log=self.log.path if self.log.path is not None else self.log.location,
            processes=self.state.num_processes,
            generated=gather_object([len(share)]),
            skipped=len(self.prompts) - len(self.pending),
            arms=self.log.summary(run_id=self.run_id),
        )
        self.state.print(summary)
        return summary

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> GenerateJob:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _key(self, index: int, image_index: int) -> tuple[str, int, int]:
        """What identifies an image's record within the run (a record has no prompt index)."""
        return self.prompts[index], self.config.seed + index, image_index

    def _image_file(self, index: int, image_index: int) -> Path:
        return self.out / "images" / f"{index:05d}_{image_index}.png"

    def _check_no_overwrite(self, logged: list[QualityRecord]) -> None:
        """Refuses to overwrite an image that a logged record of another image points at.

        File names hold the prompt's index, so a changed prompts file, seed or run id would
        otherwise silently replace the images of earlier records.
        """
        owners = {record.image_path: record for record in logged if record.image_path is not None}
        for index in self.pending:
            for image_index in range(self.config.images_per_prompt):
                path = record_path(self._image_file(index, image_index), self.log.path)
                owner = owners.get(path)
                mine = (self.run_id, *self._key(index, image_index))
                if owner is not None and (owner.run_id, owner.prompt, owner.seed, owner.image_index) != mine:
                    raise ValueError(
                        f"{path} is the image of a record of run {owner.run_id!r} (prompt {owner.prompt!r}, "
                        f"seed {owner.seed}) in {self.log.location}; the prompts, seed or run id differ now: "
                        "use another out directory"
                    )

    def _done(self, index: int) -> bool:
        for image_index in range(self.config.images_per_prompt):
            record = self._logged.get(self._key(index, image_index))
            if record is None or record.image_path is None:
                return False
            if not resolve_record_path(record.image_path, self.log.path).is_file():
                return False
        return True

    def _generate(self, index: int) -> None:
        """Generates one prompt's images, saves them, then logs the records of those not yet logged.

        Writing no second record for an image that has one keeps the log free of duplicates when
        a prompt is redone because a file went missing.
        """
        seed = self.config.seed + index
        output = self.pipe(
            self.prompts[index],
            num_images_per_prompt=self.config.images_per_prompt,
            generator=torch.Generator(self.device).manual_seed(seed),
            **self.call_kwargs,
        )
        generated = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(self.pipe.last_generated.float()))
        records = []
        for image_index, (image, original, record, report) in enumerate(
            zip(output.images, generated, output.quality, self.pipe.last_reports)
        ):
            stem = self._image_file(index, image_index).stem
            record.image_path = self._save(image, "images", f"{stem}.png")
            if record.decision in ORIGINAL_SAVED_DECISIONS:
                record.original_image_path = self._save(original, "images", f"{stem}_original.png")
            if report is not None:
                record.map_paths = {
                    name: self._save(overlay(original, values.float().cpu()), "maps", f"{stem}_{name}.png")
                    for name, values in (("P", report.P), ("A", report.A))
                }
            if self._key(index, image_index) not in self._logged:
                records.append(record)
        self.log.write_many(records)

    def _save(self, image: Any, folder: str, name: str) -> str:
        """Saves a PIL image under ``out/folder`` and returns its path as records store it."""
        directory = self.out / folder
        directory.mkdir(exist_ok=True)
        path = directory / name
        image.save(path)
        return record_path(path, self.log.path)
