"""Shared fixtures: tiny random-weight models built offline (no real weights exist here)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests need real weights on disk; they run only with GREFINE_RUN_SLOW=1."""
    if os.environ.get("GREFINE_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="needs real weights; set GREFINE_RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_clip_parts():
    """(model, preprocess, tokenizer) of the tiny open_clip ViT, seed 0. Do not mutate."""
    from grefine_hooks.testing import tiny_clip

    return tiny_clip(seed=0)


@pytest.fixture(scope="session")
def scorer(tiny_clip_parts):
    """A QualityScorer over the tiny CLIP (random weights stand in for ViT-B-16/openai)."""
    from grefine_hooks.scoring.scorer import QualityScorer

    model, preprocess, tokenizer = tiny_clip_parts
    return QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer)
