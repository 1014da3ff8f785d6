"""The grefine command line: score images, train quality prompts, generate in batch, evaluate the
quality gain, report, A/B verdicts and feedback, doctor."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image, UnidentifiedImageError

from .errors import WeightsNotFoundError
from .records import UnknownRecordError

if TYPE_CHECKING:
    import torch

# Names of the torch dtypes the commands accept; torch is imported by the commands that need it,
# so light commands (``grefine report``) start without it.
_DTYPES = ("bfloat16", "float16", "float32")
# ``--family`` choices: the keys of grefine_hooks.loading.REFINED_PIPELINES (a test keeps them equal).
FAMILIES = ("sd15", "sdxl", "pixart-alpha", "pixart-sigma", "cascade")
#: Entry-point group of subcommands other packages add (``grefine serve`` comes from
#: grefine_integrations this way): each names ``register(subparsers)``, which adds its parser.
COMMAND_ENTRY_POINTS = "grefine_hooks.commands"
_LOG_FORMATS = ".jsonl, .sqlite, .sqlite3, .db or a postgresql:// URL"


def _add_clip_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--clip", default="ViT-B-16", help="open_clip model name or local-dir:FOLDER")
    parser.add_argument("--pretrained", default="openai", help="open_clip weights tag or file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    if dtype:
        parser.add_argument("--dtype", choices=_DTYPES, default=None, help="CLIP dtype")


def _add_job_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The steps, device and scorer options every batch job (`generate`, `evaluate`) loads its pipeline with."""
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("--device", help="torch device (default: the process's accelerate device)")
    parser.add_argument("--dtype", choices=_DTYPES, help="pipeline dtype (default: float16 on CUDA)")
    parser.add_argument("--quality-prompts", metavar="FILE|handwritten", help="the scorer's PQ-Map prompts")
    parser.add_argument("--clip", default="ViT-B-16", help="the scorer's open_clip model or local-dir:FOLDER")
    parser.add_argument("--pretrained", default="openai", help="the scorer's open_clip weights tag or file")


def _default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype called ``name`` (None stays None: the model's own)."""
    import torch

    return None if name is None else getattr(torch, name)


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path!r}: {error}") from error


def _print_report(path: str, report) -> None:
    print(f"{path}: p={report.p:.3f} a={report.a:.3f}")
    factors = " ".join(f"{name}={value:.3f}" for name, value in report.factors.items())
    print(f"  factors: {factors}")
    for phrase in report.phrases:
        defect = phrase.defect or "ok"
        ancestor = f" <- {phrase.ancestor}" if phrase.ancestor else ""
        print(
            f"  phrase {phrase.text!r} (noun {phrase.noun!r}{ancestor}): "
            f"a_noun={phrase.a_noun:.3f} a_phrase={phrase.a_phrase:.3f} [{defect}]"
        )
    if not report.phrases:
        print("  phrases: none (no noun found; a is the whole prompt's alignment)")
    print(f"  emphasized prompt: {report.emphasized_prompt!r}")


def _save_maps(directory: Path, path: str, image: Image.Image, report) -> None:
    from .visualize import overlay

    directory.mkdir(parents=True, exist_ok=True)
    stem = Path(path).stem
    overlay(image, report.P).save(directory / f"{stem}_P.png")
    overlay(image, report.A).save(directory / f"{stem}_A.png")


def _score(args: argparse.Namespace) -> int:
    from .scoring.scorer import QualityScorer

    images = [_open_image(path) for path in args.images]
    scorer = QualityScorer(
        args.clip,
        args.pretrained,
        device=_default_device(args.device),
        dtype=_dtype(args.dtype),
        quality_prompts=args.quality_prompts,
    )
    reports = scorer.score(images, [args.prompt] * len(images))
    if args.save_maps:
        for path, image, report in zip(args.images, images, reports):
            _save_maps(Path(args.save_maps), path, image, report)
    if args.json:
        print(json.dumps([{"image": path, **report.summary()} for path, report in zip(args.images, reports)], indent=2))
    else:
        for path, report in zip(args.images, reports):
            _print_report(path, report)
    return 0


def _existing_log(location: str):
    """Opens a log a command reads or adds to: a file must exist already (opening would create it)."""
    from .records import QualityLog, is_database_url

    if not is_database_url(location) and not Path(location).is_file():
        raise FileNotFoundError(f"quality log {location!r} does not exist")
    return QualityLog(location)


def _train_prompts(args: argparse.Namespace) -> int:
    from .scoring.prompt_training import read_log_ratings, train_quality_prompts

    if (args.from_log is None) == (args.ratings is None):
        raise ValueError("give either --ratings with --images, or --from-log")
    if args.ratings is not None and args.images is None:
        raise ValueError("--ratings needs --images, the directory its image paths are relative to")
    ratings = args.ratings
    if args.from_log is not None:
        if args.images is not None or args.factors:
            raise ValueError("--from-log reads the images and their feedback from the log: drop --images/--factors")
        with _existing_log(args.from_log) as log:
            ratings = read_log_ratings(log, run_id=args.run_id, missing=args.missing)
    result = train_quality_prompts(
        ratings,
        args.images,
        args.out,
        clip=args.clip,
        pretrained=args.pretrained,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        val_split=args.val_split,
        use_factors=args.factors,
        n_ctx=args.n_ctx,
        init_prompts=args.init_prompts,
        seed=args.seed,
        missing=args.missing,
        device=_default_device(args.device),
        patience=args.patience or None,
        allow_worse=args.allow_worse,
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} missing image(s): {', '.join(result.skipped)}")
    print(f"trained on {result.n_train} images, validated on {result.n_val}; "
          f"kept epoch {result.best_epoch} of {result.epochs_run} run (best validation SRCC)")
    print(f"  SRCC {result.srcc_before:.3f} -> {result.srcc_after:.3f}")
    if result.srcc_after < result.srcc_before:
        print("  WARNING: these prompts validate worse than the starting ones (--allow-worse)")
    print(f"  PLCC {result.plcc_before:.3f} -> {result.plcc_after:.3f}")
    print(f"  alphas {', '.join(f'{alpha:.3f}' for alpha in result.alphas)}")
    print(f"wrote {result.path}")
    print(f"  use: grefine score ... --clip {args.clip} --pretrained {args.pretrained} --quality-prompts {result.path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import GenerateConfig, GenerateJob

    config = GenerateConfig(
        family=args.family, prompts=args.prompts, out=args.out, model=args.model, tiny=args.tiny,
        policy=args.policy, log=args.log, ab_split=args.ab_split, images_per_prompt=args.images_per_prompt,
        seed=args.seed, steps=args.steps, device=args.device, dtype=_dtype(args.dtype),
        quality_prompts=args.quality_prompts, clip=args.clip, pretrained=args.pretrained, run_id=args.run_id,
    )
    with GenerateJob(config) as job:  # checks every input before any model is loaded
        if job.pending:  # a finished run needs no model
            job.load()
        job.run()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import DEFAULT_METRICS, EvaluateConfig, EvaluateJob

    config = EvaluateConfig(
        out=args.out, prompts=args.prompts, family=args.family, model=args.model, tiny=args.tiny,
        policy=args.policy, seed=args.seed, steps=args.steps, device=args.device, dtype=_dtype(args.dtype),
        quality_prompts=args.quality_prompts, clip=args.clip, pretrained=args.pretrained,
        metrics=args.metric or list(DEFAULT_METRICS), allow_downloads=args.allow_downloads,
        n_resamples=args.resamples,
    )
    with EvaluateJob(config) as job:  # checks every input before any model is loaded
        table = job.run(echo=not args.json)
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor
    from .generate import load_policy
    from .scoring.scorer import QualityScorer

    images = [_open_image(path) for path in args.images] or None
    scorer = QualityScorer(
        args.clip, args.pretrained, device=_default_device(args.device), dtype=_dtype(args.dtype),
        quality_prompts=args.quality_prompts, text_templates=args.text_templates,
        map_normalization=args.map_normalization, adjective_margin=args.adjective_margin,
    )
    report = run_doctor(scorer, images, policy=load_policy(args.policy), count=args.count, seed=args.seed)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 3 if report.failed else 0


def _feedback(args: argparse.Namespace) -> int:
    with _existing_log(args.log) as log:
        item = log.add_feedback(args.record_id, args.score, source=args.source, comment=args.comment)
    print(f"feedback {item.feedback_id}: score {item.score:g} on record {item.record_id} ({item.source})")
    return 0


def _ab(args: argparse.Namespace) -> int:
    from .ab_stats import format_comparison

    with _existing_log(args.log) as log:
        comparison = log.compare(run_id=args.run_id, n_resamples=args.resamples, seed=args.seed)
    print(json.dumps(comparison.to_dict(), indent=2) if args.json else format_comparison(comparison))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grefine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score images against a prompt (PQ-Map, AQ-Map)")
    score.add_argument("images", nargs="+", metavar="IMAGE")
    score.add_argument("--prompt", required=True, help="the prompt the images were generated from")
    score.add_argument("--json", action="store_true", help="print one JSON document")
    score.add_argument("--save-maps", metavar="DIR", help="write P and A heat-map overlays as PNG")
    score.add_argument(
        "--quality-prompts",
        metavar="FILE|handwritten",
        help="PQ-Map prompts: a train-prompts file or 'handwritten' (default: released prompts for ViT-B-16/openai)",
    )
    _add_clip_arguments(score)
    score.set_defaults(run=_score)

    train = commands.add_parser("train-prompts", help="learn PQ-Map quality prompts from rated images")
    train.add_argument("--ratings", help="CSV with image,mos[,technical,rationality,naturalness]")
    train.add_argument("--images", metavar="DIR", help="directory the CSV's image paths are in")
    train.add_argument(
        "--from-log", metavar="LOG", help="instead of --ratings: the log's images, rated by their feedback"
    )
    train.add_argument("--run-id", metavar="ID", help="with --from-log: only this run's images")
    train.add_argument("--out", required=True, metavar="FILE", help="prompts file to write (.safetensors)")
    train.add_argument("--epochs", type=int, default=50)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--val-split", type=float, default=0.2, help="share of images held out for SRCC/PLCC")
    train.add_argument("--factors", action="store_true", help="also fit the factor columns the CSV has")
    train.add_argument("--n-ctx", type=int, default=None, help="context tokens per prompt (default 16)")
    train.add_argument("--init-prompts", metavar="FILE", help="start from this prompts file (same CLIP)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--missing", choices=("error", "skip"), default="error", help="listed images not found")
    train.add_argument("--patience", type=int, default=20,
                       help="stop after this many epochs without a better validation SRCC (0: never)")
    train.add_argument("--allow-worse", action="store_true",
                       help="write the best epoch even if it validates worse than the starting prompts")
    _add_clip_arguments(train, dtype=False)
    train.set_defaults(run=_train_prompts)

    generate = commands.add_parser("generate", help="generate, score and refine images for a file of prompts")
    generate.add_argument("--model", help="hub id or folder of the pipeline (not needed with --tiny)")
    generate.add_argument(
        "--family",
        choices=FAMILIES,
        help="checked against the model's model_index.json, which names it when omitted (--tiny: sd15)",
    )
    generate.add_argument("--prompts", required=True, metavar="FILE", help="one prompt per line; '#' lines skipped")
    generate.add_argument("--out", required=True, metavar="DIR", help="images/, maps/ and the default log go here")
    generate.add_argument("--policy", metavar="FILE", help="RefinePolicy as a JSON object")
    generate.add_argument(
        "--log", metavar="LOG", help=f"quality log, {_LOG_FORMATS} (default: DIR/quality.sqlite)"
    )
    generate.add_argument("--ab-split", type=float, help="share of images refined (overrides the policy's)")
    generate.add_argument("--images-per-prompt", type=int, default=1, metavar="N")
    generate.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed S + i")
    _add_job_pipeline_arguments(generate)
    generate.add_argument("--run-id", help="default: derived from DIR, so reruns resume the same run")
    generate.add_argument("--tiny", action="store_true", help="offline tiny random-weight models (no --model)")
    generate.set_defaults(run=_generate)

    evaluate = commands.add_parser(
        "evaluate", help="quality gain on your model: base, G-Refine, always-refine and best-of-2 under independent metrics"
    )
    evaluate.add_argument("--model", help="hub id or folder of the pipeline (not with --tiny)")
    evaluate.add_argument("--family", choices=FAMILIES, help="checked against the model's model_index.json (--tiny: sd15)")
    evaluate.add_argument("--tiny", action="store_true", help="offline tiny random-weight models (no --model)")
    evaluate.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: the shipped 24 prompts)")
    evaluate.add_argument("--out", required=True, metavar="DIR", help="images, scores and the table go here")
    evaluate.add_argument("--policy", metavar="FILE", help="G-Refine's RefinePolicy as a JSON object")
    evaluate.add_argument(
        "--metric", action="append", metavar="NAME|MODULE:FUNCTION",
        help="a metric (repeat for several): clipiqa, musiq, liqe, topiq, qalign, brisque, clipscore, imagereward, "
             "pickscore, hpsv2, or an importable (images, prompts) -> scores callable (default: all built-in ones)",
    )
    evaluate.add_argument("--allow-downloads", action="store_true", help="let metric libraries download missing weights")
    evaluate.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed S + i")
    _add_job_pipeline_arguments(evaluate)
    evaluate.add_argument("--resamples", type=int, default=9999, metavar="N", help="bootstrap resamples (default 9999)")
    evaluate.add_argument("--json", action="store_true", help="also print the table as one JSON document")
    evaluate.set_defaults(run=_evaluate)

    report = commands.add_parser("report", help="write a self-contained HTML A/B report of a quality log")
    report.add_argument("log", metavar="LOG", help=f"quality log, {_LOG_FORMATS}")
    report.add_argument("--out", required=True, metavar="FILE", help="HTML file to write")
    report.add_argument("--run-id", default=None, metavar="ID", help="report only this run (default: every record)")
    report.add_argument(
        "--max-thumbnails", type=int, default=50, metavar="N", help="refined/reverted images shown (default 50)"
    )
    report.add_argument("--evaluation", metavar="FILE", help="add the quality-gain table of grefine evaluate's evaluation.json")
    report.set_defaults(run=_report)

    doctor = commands.add_parser("doctor", help="check the scorer with the CLIP weights on disk (exit 3: a check failed)")
    doctor.add_argument("images", nargs="*", metavar="IMAGE", help="your images, a shape is pasted in (default: drawn)")
    doctor.add_argument("--count", type=int, default=4, help="drawn images when no IMAGE is given")
    doctor.add_argument("--policy", metavar="FILE", help="RefinePolicy as a JSON object; its thresholds are checked")
    doctor.add_argument("--quality-prompts", metavar="FILE|handwritten", help="the scorer's PQ-Map prompts")
    doctor.add_argument("--text-templates", choices=("none", "clip-surgery"), help="AQ-Map text encoding (default: none)")
    doctor.add_argument("--map-normalization", choices=("absolute", "minmax"), default="absolute")
    doctor.add_argument("--adjective-margin", type=float, default=0.0)
    doctor.add_argument("--seed", type=int, default=0)
    doctor.add_argument("--json", action="store_true", help="print one JSON document")
    _add_clip_arguments(doctor)
    doctor.set_defaults(run=_doctor)

    feedback = commands.add_parser("feedback", help="add a user's verdict on a logged image")
    feedback.add_argument("log", metavar="LOG", help=f"quality log, {_LOG_FORMATS}")
    feedback.add_argument("record_id", metavar="RECORD_ID", help="the image's record id")
    feedback.add_argument("score", metavar="SCORE", help="'up', 'down' or a rating in [0, 1] (1 = liked)")
    feedback.add_argument("--source", default="user", help="who gave it (default: user)")
    feedback.add_argument("--comment", help="free text")
    feedback.set_defaults(run=_feedback)

    ab = commands.add_parser("ab", help="treatment vs control with 95%% bootstrap intervals, and a verdict")
    ab.add_argument("log", metavar="LOG", help=f"quality log, {_LOG_FORMATS}")
    ab.add_argument("--run-id", default=None, metavar="ID", help="compare only this run (default: every record)")
    ab.add_argument("--json", action="store_true", help="print one JSON document")
    ab.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ab.add_argument("--resamples", type=int, default=9999, metavar="N", help="bootstrap resamples (default 9999)")
    ab.set_defaults(run=_ab)
    _add_plugin_commands(commands)
    return parser


def _add_plugin_commands(commands: argparse._SubParsersAction) -> None:
    """Subcommands of installed packages; one that fails to load is named on stderr, never fatal."""
    for entry in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda entry: entry.name):
        if entry.name in commands.choices:
            continue  # a built-in command, or the same package seen twice on sys.path
        try:
            entry.load()(commands)
        except Exception as error:
            print(f"grefine: command {entry.name!r} ({entry.value}) could not load: {error}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    evaluation = None
    if args.evaluation is not None:
        try:
            evaluation = json.loads(Path(args.evaluation).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"cannot read --evaluation {args.evaluation!r}: {error}") from None
    path = write_report(args.log, args.out, run_id=args.run_id, max_thumbnails=args.max_thumbnails,
                        evaluation=evaluation)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; exit code 2 for bad input (the message says which), 1 for missing weights."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, UnknownRecordError) as error:
        print(f"grefine {args.command}: {error}", file=sys.stderr)
        return 1 if isinstance(error, WeightsNotFoundError) else 2


if __name__ == "__main__":
    sys.exit(main())
