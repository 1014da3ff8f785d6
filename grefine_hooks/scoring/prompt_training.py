"""Learned quality prompts: fit the PQ-Map's prompt embeddings ``T_p`` to rated images.

G-Refine (section 3.1, eqs. 2-3) learns the 4 x 2 quality prompts' token embeddings from
subjective scores: the image encoder stays frozen, the text encoder's token-embedding layer is
bypassed, and the difference between the PQ-Map's score ``p`` and the rating updates ``T_p``.
Here only the context embeddings of each prompt are learned (CLIP-IQA+'s layout, see
:class:`~grefine_hooks.scoring.learned_prompts.LearnedPrompts`); the start-of-text, name
("Good photo." / "Bad photo.") and end-of-text tokens stay the CLIP's own embeddings.

Image features are computed once with :meth:`QualityScorer.encode_images`, the scorer's own image
forward, and the predicted score is the scorer's eq. 3 at the global embedding, so a saved file
scores exactly as it was trained.

>>> from grefine_hooks.scoring import train_quality_prompts
>>> result = train_quality_prompts("ratings.csv", "images/", "prompts.safetensors")
>>> result.srcc_before, result.srcc_after
>>> scorer = QualityScorer(quality_prompts="prompts.safetensors")
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .images import to_rgb_tensor
from .learned_prompts import (
    FACTOR_IMPORTANCE,
    NAME_LENGTH,
    LearnedPrompts,
    check_compatible,
    encode_token_embeddings,
    load_learned_prompts,
    save_learned_prompts,
    text_tower,
)
from .maps import minmax
from .perceptual import FACTORS, cask_effect, pair_probabilities
from .scorer import QualityScorer

logger = logging.getLogger(__name__)

#: Fewer rated images than this cannot give a meaningful split and correlation.
MIN_IMAGES = 10
#: CLIP-IQA's antonym pair, the name tokens of every factor's pair.
PAIR_NAMES = ("Good photo.", "Bad photo.")
DEFAULT_N_CTX = 16
MISSING_POLICIES = ("error", "skip")
#: Epochs without a better validation SRCC before training stops.
DEFAULT_PATIENCE = 20
_ENCODE_BATCH = 32


class PromptsNotImproved(ValueError):
    """No training epoch validated as well as the starting prompts; nothing was written."""


@dataclass(frozen=True)
class RatedImages:
    """A ratings file read and checked: what training needs from it.

    Attributes:
        names (`list[str]`): the images found, as the file names them, in file order.
        paths (`list[Path]`): their paths.
        targets (`torch.Tensor`): ``(N, 4)`` normalised MOS and technical, rationality,
            naturalness columns (``FACTORS`` order); NaN for a column the file does not have.
        skipped (`list[str]`): images listed but not found (``missing="skip"``).
        sha256 (`str`): hash of every ratings row and the bytes of every image used.
    """

    names: list[str]
    paths: list[Path]
    targets: torch.Tensor
    skipped: list[str]
    sha256: str

    @property
    def factor_columns(self) -> list[str]:
        """The factor columns the file rates, ``FACTORS`` order."""
        return [name for i, name in enumerate(FACTORS[1:], start=1) if not self.targets[:, i].isnan().any()]


@dataclass(frozen=True)
class TrainingResult:
    """What :func:`train_quality_prompts` did; correlations are on the validation split.

    Attributes:
        path (`Path`): the saved prompts file.
        prompts (`LearnedPrompts`): the trained prompts, with the file's metadata.
        alphas (`tuple[float, float, float]`): the factor thresholds saved with them.
        srcc_before, plcc_before (`float`): Spearman and Pearson correlation of ``p`` with MOS
            under the initial prompts.
        srcc_after, plcc_after (`float`): the same under the trained prompts.
        n_train, n_val (`int`): images in each split.
        val_images (`list[str]`): the held-out images, as the ratings file names them.
        skipped (`list[str]`): listed images that were not found.
        factors_supervised (`list[str]`): factor columns used as targets.
        data_sha256 (`str`): hash of the ratings rows and image bytes.
        best_epoch (`int`): the epoch whose prompts were saved (the best validation SRCC).
        epochs_run (`int`): epochs trained before early stopping (or ``epochs``).
    """

    path: Path
    prompts: LearnedPrompts
    alphas: tuple[float, float, float]
    srcc_before: float
    plcc_before: float
    srcc_after: float
    plcc_after: float
    n_train: int
    n_val: int
    val_images: list[str]
    skipped: list[str]
    factors_supervised: list[str]
    data_sha256: str
    best_epoch: int = 0
    epochs_run: int = 0


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson linear correlation (PLCC); NaN when either side is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    norm = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / norm if norm > 0 else math.nan


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing the mean of their positions."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(group, weights=ranks)
    return sums[group] / counts[group]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (SRCC), average ranks for ties; NaN when either side is constant."""
    return pearson(_average_ranks(np.asarray(x)), _average_ranks(np.asarray(y)))


def _parse_number(value: str | None, column: str, line: int, source: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"ratings {source!r} line {line}: {column} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"ratings {source!r} line {line}: {column} {value!r} is not a finite number")
    return number


def read_ratings(
    ratings: str | Path, images: str | Path, missing: str = "error", use_factors: bool = False
) -> RatedImages:
    """Reads ``image,mos[,technical,rationality,naturalness]`` rows and finds the images.

    ``image`` is a path relative to ``images``; higher scores must mean better quality. Each score
    column used is min-max normalised over all rows of the file, ``(x - min) / (max - min)``, so
    any scale (1-5, 0-100) maps to [0, 1], the range of ``p`` and of the factor probabilities; a
    constant column cannot be normalised (nor learned from) and is an error.

    Args:
        missing (`str`, defaults to `"error"`): what to do with listed images that do not exist:
            ``"error"`` raises ``FileNotFoundError`` naming them, ``"skip"`` leaves them out with
            a warning (the MOS range still comes from every row).
        use_factors (`bool`, defaults to `False`): also read the factor columns the file has;
            otherwise they are ignored.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    ratings, images = Path(ratings), Path(images)
    if not ratings.is_file():
        raise FileNotFoundError(f"ratings file {str(ratings)!r} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"images directory {str(images)!r} does not exist")
    with ratings.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file, skipinitialspace=True)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        rows = list(reader)
    for column in ("image", "mos"):
        if column not in header:
            raise ValueError(f"ratings {str(ratings)!r} has no column {column!r} (columns: {', '.join(header)})")
    columns = ["mos"] + [name for name in FACTORS[1:] if use_factors and name in header]
    if use_factors and len(columns) == 1:
        raise ValueError(f"use_factors needs at least one of the columns {', '.join(FACTORS[1:])} in {str(ratings)!r}")

    values = torch.full((len(rows), len(FACTORS)), math.nan, dtype=torch.float64)
    seen: set[str] = set()
    digest = hashlib.sha256(json.dumps(columns).encode())
    for index, row in enumerate(rows):
        line = index + 2  # the header is line 1
        name = (row["image"] or "").strip()
        if not name:
            raise ValueError(f"ratings {str(ratings)!r} line {line}: empty image")
        if name in seen:
            raise ValueError(f"ratings {str(ratings)!r} line {line}: image {name!r} is listed twice")
        seen.add(name)
        for column in columns:
            values[index, 0 if column == "mos" else FACTORS.index(column)] = _parse_number(
                row[column], column, line, str(ratings)
            )
        digest.update(json.dumps([name] + [row[column].strip() for column in columns]).encode())

    for column in columns:
        column_values = values[:, 0 if column == "mos" else FACTORS.index(column)]
        if len(rows) and column_values.min() == column_values.max():
            raise ValueError(f"ratings {str(ratings)!r}: column {column!r} is constant, nothing to learn from")
    targets = torch.where(values.isnan(), values, minmax(values.nan_to_num(), dim=0)).float()

    names = [row["image"].strip() for row in rows]
    exists = [(images / name).is_file() for name in names]
    found = [i for i, present in enumerate(exists) if present]
    absent = [name for name, present in zip(names, exists) if not present]
    if absent and missing == "error":
        listed = ", ".join(repr(name) for name in absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise FileNotFoundError(
            f"{len(absent)} image(s) listed in {str(ratings)!r} are not in {str(images)!r}: {listed}; "
            "pass missing='skip' (--missing skip) to leave them out"
        )
    if absent:
        logger.warning("skipping %d image(s) not found in %s: %s", len(absent), images, ", ".join(absent))
    if len(found) < MIN_IMAGES:
        raise ValueError(
            f"ratings {str(ratings)!r} has {len(found)} usable rated image(s)"
            f"{f' ({len(absent)} missing)' if absent else ''}; at least {MIN_IMAGES} are needed"
        )
    for i in found:
        digest.update(names[i].encode())
        digest.update((images / names[i]).read_bytes())
    kept = [names[i] for i in found]
    return RatedImages(kept, [images / name for name in kept], targets[found], absent, digest.hexdigest())


def read_log_ratings(log, run_id: str | None = None, missing: str = "error") -> RatedImages:
    """The images a quality log points at, rated by their feedback: an app's own ratings as MOS.

    Each record with feedback and an ``image_path`` is one rated image; its MOS is the mean of its
    feedback scores (thumbs are 1/0, ratings in [0, 1]), min-max normalised over the images like
    a ratings file's column. Records without feedback are left out.

    Args:
        log (`QualityLog`): an open log (any sink); relative image paths resolve against its directory.
        run_id (`str`, *optional*): only this run's records.
        missing (`str`, defaults to `"error"`): as in :func:`read_ratings`, for images not on disk.
    """
    from ..records import resolve_record_path

    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    records = [record for record in log.read(run_id=run_id) if record.image_path is not None]
    scores: dict[str, list[float]] = {}
    for item in log.feedback():
        scores.setdefault(item.record_id, []).append(item.score)
    rated = [record for record in records if record.record_id in scores]
    if not rated:
        raise ValueError(f"quality log {log.location} has no feedback on a record with an image; nothing to learn from")
    mos = torch.tensor([sum(scores[r.record_id]) / len(scores[r.record_id]) for r in rated], dtype=torch.float64)
    if mos.min() == mos.max():
        raise ValueError(
            f"quality log {log.location}: every rated image has the same mean feedback, nothing to learn from"
        )
    targets = torch.full((len(rated), len(FACTORS)), math.nan)
    targets[:, 0] = minmax(mos, dim=0).float()
    paths = [resolve_record_path(record.image_path, log.path) for record in rated]
    present = [path.is_file() for path in paths]
    found = [index for index, here in enumerate(present) if here]
    absent = [str(path) for path, here in zip(paths, present) if not here]
    if absent and missing == "error":
        listed = ", ".join(repr(name) for name in absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise FileNotFoundError(
            f"{len(absent)} rated image(s) of quality log {log.location} are not on disk: {listed}; "
            "pass missing='skip' (--missing skip) to leave them out"
        )
    if len(found) < MIN_IMAGES:
        raise ValueError(
            f"quality log {log.location} has {len(found)} usable rated image(s); at least {MIN_IMAGES} are needed"
        )
    digest = hashlib.sha256(b"quality-log")
    for index in found:
        digest.update(json.dumps([rated[index].record_id, float(mos[index])]).encode())
        digest.update(paths[index].read_bytes())
    names = [rated[index].image_path for index in found]
    return RatedImages(names, [paths[index] for index in found], targets[found], absent, digest.hexdigest())


def _load_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            return to_rgb_tensor(image, str(path))
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from error


def encode_rated_images(scorer: QualityScorer, paths: Sequence[Path], progress: bool = True) -> torch.Tensor:
    """``(N, D)`` normalised global image features, via the scorer's own image forward."""
    chunks = [paths[start : start + _ENCODE_BATCH] for start in range(0, len(paths), _ENCODE_BATCH)]
    features = [
        scorer.encode_images([_load_image(path) for path in chunk]).image.float()
        for chunk in tqdm(chunks, desc="encoding images", disable=not progress)
    ]
    return F.normalize(torch.cat(features), dim=-1)


def initial_prompts(model: torch.nn.Module, tokenizer: Callable, n_ctx: int = DEFAULT_N_CTX) -> LearnedPrompts:
    """CLIP-IQA+'s starting point: the CLIP's token embeddings of ``"X X ... X Good photo."``.

    Every factor starts from the same pair; only the context (the ``X`` tokens) is trained.
    """
    tower = text_tower(model)
    length = tower.positional_embedding.shape[0]
    longest = length - 2 - NAME_LENGTH  # start, name tokens, end
    if not 1 <= n_ctx <= longest:
        raise ValueError(f"n_ctx must be in [1, {longest}] for this CLIP's {length} tokens, got {n_ctx}")
    device = tower.token_embedding.weight.device
    tokens = tokenizer([" ".join(["X"] * n_ctx) + " " + name for name in PAIR_NAMES]).to(device)
    eot_index = 1 + n_ctx + NAME_LENGTH  # end-of-text has the highest id, as open_clip's argmax pooling assumes
    if tokens.shape[1] != length or not (tokens.argmax(dim=-1) == eot_index).all():
        raise ValueError(f"the tokenizer does not give {PAIR_NAMES} as {NAME_LENGTH} tokens each")
    with torch.no_grad():
        embeddings = tower.token_embedding(tokens).float().expand(len(FACTORS), -1, -1, -1)
    return LearnedPrompts(
        prefix=embeddings[:, :, :1].clone(),
        ctx=embeddings[:, :, 1 : 1 + n_ctx].clone(),
        suffix=embeddings[:, :, 1 + n_ctx :].clone(),
    )


def _factor_probabilities(
    model: torch.nn.Module, prompts: LearnedPrompts, ctx: torch.Tensor, features: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """``(N, 4)`` factor probabilities of normalised image features; differentiable in ``ctx``."""
    sequences = prompts.sequences(ctx).flatten(0, 1)
    pairs = F.normalize(encode_token_embeddings(model, sequences, prompts.eot_index).float(), dim=-1)
    return pair_probabilities(features, pairs.unflatten(0, (len(FACTORS), 2)), logit_scale)


def _thresholds(train_probabilities: torch.Tensor) -> torch.Tensor:
    """Alphas: relative importance times the factor's mean probability on the training split."""
    importance = torch.tensor(FACTOR_IMPORTANCE, device=train_probabilities.device)
    return importance * train_probabilities[:, 1:].detach().mean(dim=0)


def _score(probabilities: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The scorer's ``p`` (eq. 3) from factor probabilities."""
    return cask_effect(probabilities[:, 0], probabilities[:, 1:], alphas)


def _loss(probabilities: torch.Tensor, alphas: torch.Tensor, targets: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """MSE of ``p`` against MOS, plus ``1 - PLCC``, plus MSE of each supervised factor."""
    p, mos = _score(probabilities, alphas), targets[:, 0]
    plcc = F.cosine_similarity(p - p.mean(), mos - mos.mean(), dim=0)
    loss = F.mse_loss(p, mos) + (1.0 - plcc)
    if factors:
        loss = loss + F.mse_loss(probabilities[:, factors], targets[:, factors])
    return loss


def _split(
    count: int, val_split: float, generator: torch.Generator, groups: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded shuffle into (train, validation) indices.

    With ``groups`` whole groups are held out, in shuffled order, until at least ``val_split`` of
    the images are, so no group has images on both sides.
    """
    n_val = round(val_split * count)
    if groups is None:
        order = torch.randperm(count, generator=generator)
        held = order[:n_val].tolist()
    else:
        if len(groups) != count:
            raise ValueError(f"groups has {len(groups)} entries for {count} rated images")
        names = list(dict.fromkeys(groups))
        held = []
        for group in torch.randperm(len(names), generator=generator).tolist():
            if len(held) >= n_val:
                break
            held += [index for index, name in enumerate(groups) if name == names[group]]
        order = torch.tensor(held + [index for index in range(count) if index not in set(held)])
    if len(held) < 2 or count - len(held) < 2:
        raise ValueError(
            f"val_split={val_split} splits {count} images into {count - len(held)} for training and {len(held)} "
            "for validation; each side needs at least 2"
        )
    return order[len(held):], order[: len(held)]


def _resolve_init(
    init_prompts: str | Path | None,
    n_ctx: int | None,
    model: torch.nn.Module,
    tokenizer: Callable,
    names: tuple[str, str],
) -> LearnedPrompts:
    """The prompts training starts from: the ``"X"`` tokens, or a checked prompts file."""
    if init_prompts is None:
        return initial_prompts(model, tokenizer, DEFAULT_N_CTX if n_ctx is None else n_ctx)
    prompts = load_learned_prompts(init_prompts)
    check_compatible(model, prompts, repr(str(init_prompts)))
    if prompts.trained_for != names:
        raise ValueError(
            f"init_prompts {str(init_prompts)!r} were trained for CLIP {'/'.join(prompts.trained_for)}, "
            f"not {'/'.join(names)}"
        )
    if n_ctx is not None and n_ctx != prompts.ctx.shape[2]:
        raise ValueError(f"n_ctx={n_ctx} but init_prompts {str(init_prompts)!r} have {prompts.ctx.shape[2]}")
    return LearnedPrompts(prompts.prefix, prompts.ctx, prompts.suffix)


def train_quality_prompts(
    ratings: str | Path | RatedImages,
    images: str | Path | None,
    out: str | Path,
    *,
    clip: str | None = None,
    pretrained: str | None = None,
    model: torch.nn.Module | None = None,
    preprocess: Callable | None = None,
    tokenizer: Callable | None = None,
    epochs: int = 50,
    lr: float = 2e-3,
    batch_size: int = 64,
    val_split: float = 0.2,
    use_factors: bool = False,
    n_ctx: int | None = None,
    init_prompts: str | Path | None = None,
    seed: int = 0,
    missing: str = "error",
    device: str | torch.device | None = None,
    progress: bool = True,
    patience: int | None = DEFAULT_PATIENCE,
    allow_worse: bool = False,
    groups: Sequence[str] | None = None,
) -> TrainingResult:
    """Learns PQ-Map prompts from rated images on a frozen CLIP and saves them to ``out``.

    The ratings are split (seeded) into training and validation images. The loss on a batch is
    ``MSE(p, mos) + (1 - PLCC(p, mos))``: the MSE keeps ``p`` on the MOS scale, so thresholds on
    ``p`` keep their meaning; the PLCC term is scale-free and pushes the order and linearity the
    correlations measure, with useful gradients while the MSE is still dominated by an offset. On
    the test suite's synthetic set (12 splits) mean validation SRCC was 0.57 with MSE alone, 0.74
    with the PLCC term alone and 0.79 with both. ``use_factors`` adds the MSE of each rated
    factor's probability against its column.

    Thresholds follow the reference code, ``alpha_i = importance_i * mean_train(L_i)`` with
    importance (1.0, 0.6, 0.8), where ``L_i`` is the factor's predicted probability on the training
    split (the reference used its database's mean preference); they are recomputed, without
    gradient, at every step and saved as the file's ``alphas``, so the scorer computes the very
    ``p`` that was trained. Since MOS is min-max normalised, ``p = 0.5`` means the middle of the
    file's rating range.

    After every epoch the prompts are scored on the validation split; the epoch with the best SRCC
    (PLCC breaking ties; with ``use_factors``, the SRCC of ``p`` with MOS averaged with each
    supervised factor's with its column) is the one saved, as the authors released a ``net_best``
    checkpoint, and training stops once ``patience`` epochs in a row did not improve on it. If
    even that epoch validates worse than the starting prompts, nothing is written
    (`PromptsNotImproved`) unless ``allow_worse``.

    Args:
        ratings (`str`, `Path` or `RatedImages`): CSV with ``image,mos`` and optionally ``technical``,
            ``rationality``, ``naturalness``; see :func:`read_ratings` for the normalisation. Or
            images already read, e.g. :func:`read_log_ratings` of a quality log's feedback.
        images (`str` or `Path`): the directory the ``image`` paths are relative to (None with
            `RatedImages`).
        out (`str` or `Path`): the safetensors file to write (parent directories are created).
        clip, pretrained (`str`, *optional*): the open_clip model name and weights tag to load,
            defaulting to ``"ViT-B-16"`` / ``"openai"``. With ``model``, both are required: they
            name that model in the file, and a scorer loading another CLIP by name refuses it.
        model, preprocess, tokenizer (*optional*): an already-built open_clip CLIP and its parts,
            as for :class:`QualityScorer`. The model is not trained (its weights get no gradient).
        epochs (`int`, defaults to `50`), lr (`float`, defaults to `2e-3`), batch_size (`int`,
            defaults to `64`): Adam over shuffled batches of the training split.
        val_split (`float`, defaults to `0.2`): share of images held out, in (0, 1).
        groups (`list[str]`, *optional*): one label per rated image, in the ratings' order (e.g. the
            scene each distorted copy was made from); whole groups are held out, so validation
            measures images of scenes training never saw. None splits image by image.
        use_factors (`bool`, defaults to `False`): also supervise the factor columns.
        n_ctx (`int`, *optional*): context tokens per prompt, 16 (as released) by default.
        init_prompts (`str` or `Path`, *optional*): start from a prompts file instead of the
            ``"X"`` token embeddings (CLIP-IQA+'s start), e.g. ``released_prompts_path()`` to
            fine-tune the authors' prompts for ViT-B-16/openai. Its CLIP must be this one.
        seed (`int`, defaults to `0`): seeds the split and the batch order; same inputs and seed
            give identical tensors.
        missing (`str`, defaults to `"error"`): ``"error"`` or ``"skip"`` listed images not found.
        device (*optional*): where to run; defaults to the model's own.
        progress (`bool`, defaults to `True`): show tqdm progress bars.
        patience (`int`, *optional*, defaults to `20`): epochs without a better validation SRCC
            before stopping; None trains all ``epochs``.
        allow_worse (`bool`, defaults to `False`): write the best epoch even when it validates
            worse than the starting prompts (with a warning).

    Raises:
        PromptsNotImproved: no epoch reached the starting prompts' validation SRCC (and
            ``allow_worse`` is False); ``out`` is not written.

    Returns:
        A `TrainingResult`; the file's metadata also records the CLIP, ``n_ctx``, ``data_sha256``,
        the correlations before and after, ``alphas``, ``factors_supervised`` and the settings.
    """
    if not 0.0 < val_split < 1.0:
        raise ValueError(f"val_split must be in (0, 1), got {val_split}")
    if epochs < 1 or batch_size < 2 or not lr > 0:
        raise ValueError(f"epochs must be >= 1, batch_size >= 2 and lr > 0; got {epochs}, {batch_size}, {lr}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
    if model is not None and (clip is None or pretrained is None):
        raise ValueError("with model=, pass clip= and pretrained= naming it; they are recorded in the prompts file")
    names = (clip or "ViT-B-16", pretrained or "openai")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"out {str(out)!r} is a directory; give a .safetensors file path")

    data = ratings if isinstance(ratings, RatedImages) else read_ratings(ratings, images, missing, use_factors)
    supervised = data.factor_columns
    factor_indices = [FACTORS.index(name) for name in supervised]
    generator = torch.Generator().manual_seed(seed)
    train, val = _split(len(data.paths), val_split, generator, groups)

    scorer = QualityScorer(
        *names, model=model, preprocess=preprocess, tokenizer=tokenizer, device=device, quality_prompts="handwritten"
    )
    model, logit_scale = scorer.model, scorer.perceptual.logit_scale
    start = _resolve_init(init_prompts, n_ctx, model, scorer.tokenizer, names)
    start = LearnedPrompts(*(part.to(scorer.device) for part in (start.prefix, start.ctx, start.suffix)))
    features = encode_rated_images(scorer, data.paths, progress)
    targets = data.targets.to(scorer.device)

    def evaluate(ctx: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
        """Thresholds, validation SRCC and PLCC of ``p`` with MOS, and the SRCC epochs are ranked
        by: that of ``p``, averaged with each supervised factor's (what training fits)."""
        with torch.no_grad():
            probabilities = _factor_probabilities(model, start, ctx, features, logit_scale)
        alphas = _thresholds(probabilities[train])
        p = _score(probabilities[val], alphas).cpu().numpy()
        mos = targets[val, 0].cpu().numpy()
        srcc = spearman(p, mos)
        fitted = [srcc] + [
            spearman(probabilities[val, i].cpu().numpy(), targets[val, i].cpu().numpy()) for i in factor_indices
        ]
        return alphas, srcc, pearson(p, mos), float(np.mean([_comparable(value) for value in fitted]))

    _, srcc_before, plcc_before, ranked_before = evaluate(start.ctx)
    ctx = torch.nn.Parameter(start.ctx.clone())
    optimizer = torch.optim.Adam([ctx], lr=lr)
    train_features, train_targets = features[train], targets[train]
    batches = math.ceil(len(train) / batch_size)
    best: tuple[tuple[float, float], int, torch.Tensor, torch.Tensor] | None = None
    epochs_run = 0
    bar = tqdm(range(1, epochs + 1), desc="training prompts", disable=not progress)
    for epoch in bar:
        for batch in torch.randperm(len(train), generator=generator).tensor_split(batches):
            # One text forward per step; all training images share it, so the thresholds see them all.
            probabilities = _factor_probabilities(model, start, ctx, train_features, logit_scale)
            alphas = _thresholds(probabilities)
            loss = _loss(probabilities[batch], alphas, train_targets[batch], factor_indices)
            optimizer.zero_grad()
            loss.backward(inputs=[ctx])  # the CLIP stays frozen: no gradient reaches its weights
            optimizer.step()
        epochs_run = epoch
        epoch_alphas, srcc, plcc, ranked = evaluate(ctx.detach())
        key = (ranked, _comparable(plcc))
        if best is None or key > best[0]:
            best = (key, epoch, ctx.detach().clone(), epoch_alphas)
        bar.set_postfix(loss=f"{loss.item():.4f}", val_srcc=f"{srcc:.3f}", best_epoch=best[1])
        if patience is not None and epoch - best[1] >= patience:
            break
    (ranked_after, _), best_epoch, best_ctx, alphas = best
    _, srcc_after, plcc_after, _ = evaluate(best_ctx)

    summary = (
        f"validation SRCC {srcc_before:.3f} with the starting prompts, {srcc_after:.3f} at the best epoch "
        f"({best_epoch} of {epochs_run} run)"
    )
    if supervised:
        summary += f"; mean SRCC with the factor columns {ranked_before:.3f} -> {ranked_after:.3f}"
    if ranked_after < ranked_before:
        if not allow_worse:
            raise PromptsNotImproved(
                f"training did not improve the prompts: {summary}; {str(out)!r} was not written. Keep the "
                "starting prompts, or pass allow_worse=True (--allow-worse) to write the best epoch anyway"
            )
        logger.warning("writing prompts that validate worse than the starting ones (allow_worse): %s", summary)
    else:
        logger.info("prompts trained: %s", summary)

    alpha_values = tuple(alphas.tolist())
    metadata = {
        "clip_model": names[0],
        "pretrained": names[1],
        "n_ctx": str(ctx.shape[2]),
        "data_sha256": data.sha256,
        "srcc_before": repr(srcc_before),
        "plcc_before": repr(plcc_before),
        "srcc_after": repr(srcc_after),
        "plcc_after": repr(plcc_after),
        "alphas": json.dumps(alpha_values),
        "factors_supervised": json.dumps(supervised),
        "training": json.dumps(
            {
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "val_split": val_split,
                "seed": seed,
                "n_train": len(train),
                "n_val": len(val),
                "init_prompts": None if init_prompts is None else str(init_prompts),
                "patience": patience,
                "best_epoch": best_epoch,
                "epochs_run": epochs_run,
                "allow_worse": allow_worse,
            }
        ),
    }
    trained = LearnedPrompts(start.prefix.cpu(), best_ctx.cpu(), start.suffix.cpu(), metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_learned_prompts(trained, out)
    return TrainingResult(
        path=out,
        prompts=trained,
        alphas=alpha_values,
        srcc_before=srcc_before,
        plcc_before=plcc_before,
        srcc_after=srcc_after,
        plcc_after=plcc_after,
        n_train=len(train),
        n_val=len(val),
        val_images=[data.names[i] for i in val.tolist()],
        skipped=data.skipped,
        factors_supervised=supervised,
        data_sha256=data.sha256,
        best_epoch=best_epoch,
        epochs_run=epochs_run,
    )


def _comparable(correlation: float) -> float:
    """A correlation to rank epochs by: NaN (constant scores) ranks below every number."""
    return -math.inf if math.isnan(correlation) else correlation
