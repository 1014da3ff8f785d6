"""The grefine command line: score images, train quality prompts, generate in batch, report."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image, UnidentifiedImageError

from .errors import WeightsNotFoundError

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


def _add_clip_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--clip", default="ViT-B-16", help="open_clip model name or local-dir:FOLDER")
    parser.add_argument("--pretrained", default="openai", help="open_clip weights tag or file")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    if dtype:
        parser.add_argument("--dtype", choices=_DTYPES, default=None, help="CLIP dtype")


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


def _train_prompts(args: argparse.Namespace) -> int:
    from .scoring.prompt_training import train_quality_prompts

    result = train_quality_prompts(
        args.ratings,
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
    train.add_argument("--ratings", required=True, help="CSV with image,mos[,technical,rationality,naturalness]")
    train.add_argument("--images", required=True, metavar="DIR", help="directory the CSV's image paths are in")
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
    generate.add_argument("--log", metavar="FILE", help="quality log, .jsonl or .sqlite (default: DIR/quality.sqlite)")
    generate.add_argument("--ab-split", type=float, help="share of images refined (overrides the policy's)")
    generate.add_argument("--images-per-prompt", type=int, default=1, metavar="N")
    generate.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed S + i")
    generate.add_argument("--steps", type=int, help="num_inference_steps (default: the pipeline's)")
    generate.add_argument("--device", help="torch device (default: the process's accelerate device)")
    generate.add_argument("--dtype", choices=_DTYPES, help="pipeline dtype (default: float16 on CUDA)")
    generate.add_argument("--quality-prompts", metavar="FILE|handwritten", help="the scorer's PQ-Map prompts")
    generate.add_argument("--clip", default="ViT-B-16", help="the scorer's open_clip model or local-dir:FOLDER")
    generate.add_argument("--pretrained", default="openai", help="the scorer's open_clip weights tag or file")
    generate.add_argument("--run-id", help="default: derived from DIR, so reruns resume the same run")
    generate.add_argument("--tiny", action="store_true", help="offline tiny random-weight models (no --model)")
    generate.set_defaults(run=_generate)

    report = commands.add_parser("report", help="write a self-contained HTML A/B report of a quality log")
    report.add_argument("log", metavar="LOG", help="quality log (.jsonl, .sqlite, .sqlite3 or .db)")
    report.add_argument("--out", required=True, metavar="FILE", help="HTML file to write")
    report.add_argument("--run-id", default=None, metavar="ID", help="report only this run (default: every record)")
    report.add_argument(
        "--max-thumbnails", type=int, default=50, metavar="N", help="refined/reverted images shown (default 50)"
    )
    report.set_defaults(run=_report)
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

    path = write_report(args.log, args.out, run_id=args.run_id, max_thumbnails=args.max_thumbnails)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; exit code 2 for bad input (the message says which), 1 for missing weights."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"grefine {args.command}: {error}", file=sys.stderr)
        return 1 if isinstance(error, WeightsNotFoundError) else 2


if __name__ == "__main__":
    sys.exit(main())
