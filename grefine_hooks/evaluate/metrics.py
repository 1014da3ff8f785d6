"""Independent quality metrics for ``grefine evaluate``: the libraries the paper's tables use.

A metric is any callable ``(images, prompts) -> scores`` (PIL images, their prompts, one float
per image) with a name and a direction. The built-in names load the paper's indicators through
the packages users already trust, none of them a dependency of grefine-hooks (the ``[eval]``
extra installs them) and none of their weights shipped:

* perception, through pyiqa's ``create_metric``: ``clipiqa``, ``musiq``, ``liqe``, ``topiq``
  (pyiqa's ``topiq_nr``), ``qalign``, ``brisque`` (lower is better);
* alignment: ``clipscore`` (torchmetrics), ``imagereward`` (the ``image-reward`` package),
  ``pickscore`` (the PickScore_v1 checkpoint through transformers, as its model card shows) and
  ``hpsv2`` (the ``hpsv2`` package).

Weights come from the caches those libraries keep (pyiqa's ``~/.cache/torch/hub/pyiqa``, the
Hugging Face cache, ...): loading runs with the hub offline and ``torch.hub`` downloads refused
unless ``allow_downloads=True``, so a metric whose weights are not on disk fails to load with the
reason, which `load_metrics` returns instead of dropping the metric.

>>> metric = Metric("mean-brightness", lambda images, prompts: [0.5] * len(images))
>>> load_metrics(["musiq", metric])  # doctest: +SKIP
([Metric(name='mean-brightness', ...)], {'musiq': "ModuleNotFoundError: No module named 'pyiqa' ..."})
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

#: ``(images, prompts) -> one score per image``.
MetricFunction = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[float]]

#: Built-in perception metrics: our name -> pyiqa's metric name.
PYIQA_METRICS = {
    "clipiqa": "clipiqa",
    "musiq": "musiq",
    "liqe": "liqe",
    "topiq": "topiq_nr",
    "qalign": "qalign",
    "brisque": "brisque",
}
#: Built-in alignment metrics, in the paper's order.
ALIGNMENT_METRICS = ("clipscore", "imagereward", "pickscore", "hpsv2")
#: Every built-in name: the paper's perception indicators, then its alignment ones.
BUILTIN_METRICS = (*PYIQA_METRICS, *ALIGNMENT_METRICS)
#: What ``grefine evaluate`` scores with when no ``--metric`` is given.
DEFAULT_METRICS = BUILTIN_METRICS

# The checkpoints the alignment metrics load (Hugging Face repos); PickScore's processor is CLIP-H's.
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class MetricLoadError(RuntimeError):
    """A metric could not be built: its package is missing, or its weights are not on disk."""


@dataclass
class Metric:
    """A named image metric: ``fn(images, prompts)`` gives one score per image.

    Args:
        name (`str`): the table's column name and the key its scores are saved under.
        fn (`MetricFunction`): the scoring callable.
        lower_better (`bool`, defaults to `False`): True for metrics such as BRISQUE, whose
            lower values are better; "worse" in the table follows it.
        kind (`str`, defaults to `"custom"`): ``"perception"``, ``"alignment"`` or ``"custom"``.
        batch_size (`int`, defaults to `8`): images per ``fn`` call.
    """

    name: str
    fn: MetricFunction = field(repr=False)
    lower_better: bool = False
    kind: str = "custom"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or any(c in self.name for c in "/\\\n"):
            raise ValueError(f"metric name must be a non-empty string without '/', '\\' or newlines, got {self.name!r}")
        if not callable(self.fn):
            raise ValueError(f"metric {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.lower_better, bool):
            raise ValueError(f"metric {self.name!r}: lower_better must be True or False, got {self.lower_better!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"metric {self.name!r}: batch_size must be an integer >= 1, got {self.batch_size!r}")

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Scores ``images`` in batches; every score must be a finite number, one per image."""
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch, texts = images[start:start + self.batch_size], prompts[start:start + self.batch_size]
            values = np.asarray(_as_numpy(self.fn(list(batch), list(texts))), dtype=np.float64).reshape(-1)
            if values.size != len(batch):
                raise ValueError(f"metric {self.name!r} returned {values.size} score(s) for {len(batch)} image(s)")
            if not np.all(np.isfinite(values)):
                raise ValueError(f"metric {self.name!r} returned a non-finite score: {values.tolist()}")
            scores += values.tolist()
        return scores


def worse(metric_lower_better: bool, value: float, reference: float) -> bool:
    """True when ``value`` is strictly worse than ``reference`` on a metric of that direction."""
    return value > reference if metric_lower_better else value < reference


def load_metrics(
    specs: Sequence[str | Metric], device: Any = None, *, allow_downloads: bool = False
) -> tuple[list[Metric], dict[str, str]]:
    """Builds each metric; returns the loaded ones and, for the others, why they did not load.

    Args:
        specs: `Metric` objects (kept as they are), built-in names (`BUILTIN_METRICS`) or
            ``"module:function"`` import paths of a `MetricFunction` (or of a `Metric`).
        device: where model-based metrics run (default: CUDA when available, else CPU).
        allow_downloads (`bool`, defaults to `False`): let the metric libraries fetch missing weights.

    Raises:
        ValueError: for a spec that is neither, or two metrics of one name (a bad argument, not a
            metric that failed to load).
    """
    loaded: list[Metric] = []
    failed: dict[str, str] = {}
    names: set[str] = set()
    for spec in specs:
        name = spec.name if isinstance(spec, Metric) else check_spec(spec)
        if name in names:
            raise ValueError(f"metric {name!r} is given twice")
        names.add(name)
        if isinstance(spec, Metric):
            loaded.append(spec)
            continue
        try:
            loaded.append(load_metric(spec, device, allow_downloads=allow_downloads))
        except MetricLoadError as error:
            failed[name] = str(error)
    return loaded, failed


def check_spec(spec: Any) -> str:
    """The metric name of a spec (a built-in name or ``module:function``), or a ValueError saying why not."""
    if not isinstance(spec, str):
        raise ValueError(f"a metric must be a name, 'module:function' or a Metric, got {type(spec).__name__}")
    if spec in BUILTIN_METRICS:
        return spec
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise ValueError(
            f"unknown metric {spec!r}: give one of {', '.join(BUILTIN_METRICS)} or 'module:function'"
        )
    return spec


def load_metric(spec: str, device: Any = None, *, allow_downloads: bool = False) -> Metric:
    """One metric from a built-in name or ``"module:function"``; `MetricLoadError` says why it cannot load."""
    import torch

    check_spec(spec)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if spec in PYIQA_METRICS:
            importlib.import_module("pyiqa")  # first, so that its downloader is refused too
        importlib.import_module("huggingface_hub.constants")
        with contextlib.ExitStack() as stack:
            if not allow_downloads:
                stack.enter_context(_offline())
            if spec in PYIQA_METRICS:
                return _pyiqa_metric(spec, device)
            if spec in ALIGNMENT_METRICS:
                return _ALIGNMENT_LOADERS[spec](device, allow_downloads)
            return _imported_metric(spec)
    except MetricLoadError:
        raise
    except Exception as error:  # a missing package, missing weights, a library's own failure
        hint = ""
        if isinstance(error, ImportError) and spec in BUILTIN_METRICS:
            package = getattr(error, "name", None)
            hint = (' (pip install "grefine-hooks[eval]")' if package in ("pyiqa", "torchmetrics")
                    else f" (the metric needs the package {package!r}: see README, 'Does it help on your model?')")
        elif not allow_downloads and spec in BUILTIN_METRICS:
            hint = " (loaded offline: are its weights in the local cache?)"

        raise MetricLoadError(f"{type(error).__name__}: {error}{hint}") from error


def _imported_metric(spec: str) -> Metric:
    module_name, _, attribute = spec.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise MetricLoadError(f"cannot import {spec!r}: {error}") from error
    if isinstance(value, Metric):
        return value
    if not callable(value):
        raise MetricLoadError(f"{spec!r} is a {type(value).__name__}, not a callable (images, prompts) -> scores")
    return Metric(spec, value, lower_better=bool(getattr(value, "lower_better", False)))


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face hub offline and ``torch.hub`` downloads refused, for the calls inside."""
    import torch.hub

    def refuse(url: Any, *args: Any, **kwargs: Any) -> None:
        url = getattr(url, "full_url", url)  # urlopen may get a Request
        raise MetricLoadError(f"weights not in the local cache (would download {url}; pass allow_downloads)")

    def refuse_request(session: Any, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        refuse(url)

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({key: "1" for key in saved_env})
    # torch.hub and OpenAI's clip package fetch through urllib; pyiqa's Google-Drive helper through requests.
    patched: list[tuple[Any, str, Any]] = [
        (torch.hub, "download_url_to_file", refuse), (urllib.request, "urlopen", refuse),
    ]
    if "requests" in sys.modules:
        patched.append((sys.modules["requests"].Session, "request", refuse_request))
    # pyiqa binds torch.hub's downloader at import, and huggingface_hub reads its offline flag once.
    for module_name, name, value in (("pyiqa.utils.download_util", "download_url_to_file", refuse),
                                     ("huggingface_hub.constants", "HF_HUB_OFFLINE", True)):
        if module_name in sys.modules:
            patched.append((sys.modules[module_name], name, value))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, value in patched:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pyiqa_metric(name: str, device: Any) -> Metric:
    import pyiqa
    import torch

    model = pyiqa.create_metric(PYIQA_METRICS[name], device=device, as_loss=False)

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        with torch.no_grad():
            values = [model(_to_tensor(image).to(device)) for image in images]  # sizes may differ
        return [float(value.reshape(-1)[0]) for value in values]

    return Metric(name, score, lower_better=bool(model.lower_better), kind="perception", batch_size=1)


def _clipscore(device: Any, allow_downloads: bool) -> Metric:
    import torch
    from huggingface_hub import snapshot_download
    from torchmetrics.multimodal.clip_score import CLIPScore

    local = snapshot_download(CLIPSCORE_MODEL, local_files_only=not allow_downloads)
    model = CLIPScore(model_name_or_path=local).to(device)

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        values = []
        with torch.no_grad():
            for image, prompt in zip(images, prompts):  # the metric's state would average a batch
                model.reset()
                values.append(float(model(_to_tensor(image, scale=255.0).to(device), prompt)))
        return values

    return Metric("clipscore", score, kind="alignment")


def _imagereward(device: Any, allow_downloads: bool) -> Metric:
    import ImageReward

    model = ImageReward.load("ImageReward-v1.0", device=str(device))

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [float(model.score(prompt, [image])) for image, prompt in zip(images, prompts)]

    return Metric("imagereward", score, kind="alignment")


def _pickscore(device: Any, allow_downloads: bool) -> Metric:
    import torch
    from transformers import AutoModel, AutoProcessor

    local_only = not allow_downloads
    processor = AutoProcessor.from_pretrained(PICKSCORE_PROCESSOR, local_files_only=local_only)
    model = AutoModel.from_pretrained(PICKSCORE_MODEL, local_files_only=local_only).eval().to(device)

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        pixels = processor(images=list(images), return_tensors="pt").to(device)
        text = processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        with torch.no_grad():
            image_features = torch.nn.functional.normalize(model.get_image_features(**pixels), dim=-1)
            text_features = torch.nn.functional.normalize(model.get_text_features(**text), dim=-1)
        return (model.logit_scale.exp() * (image_features * text_features).sum(-1)).tolist()

    return Metric("pickscore", score, kind="alignment")


def _hpsv2(device: Any, allow_downloads: bool) -> Metric:
    import hpsv2

    def score(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [float(hpsv2.score([image], prompt, hps_version="v2.1")[0]) for image, prompt in zip(images, prompts)]

    score([Image.new("RGB", (224, 224))], ["a test image"])  # loads (and checks) the weights now, not mid-run
    return Metric("hpsv2", score, kind="alignment")


_ALIGNMENT_LOADERS: dict[str, Callable[[Any, bool], Metric]] = {
    "clipscore": _clipscore,
    "imagereward": _imagereward,
    "pickscore": _pickscore,
    "hpsv2": _hpsv2,
}


def _to_tensor(image: Image.Image, scale: float = 1.0) -> Any:
    """``(1, 3, H, W)`` float RGB in ``[0, scale]``."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 * scale
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _as_numpy(values: Any) -> Any:
    """Tensors (on any device) and sequences of numbers to something numpy reads."""
    if hasattr(values, "detach"):
        return values.detach().float().cpu().numpy()
    if isinstance(values, (list, tuple)):
        return [float(v.detach().float().cpu().reshape(-1)[0]) if hasattr(v, "detach") else v for v in values]
    return values
