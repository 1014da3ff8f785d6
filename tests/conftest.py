"""Shared fixtures: tiny random-weight models built offline (no real weights exist here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/postgres_server.py is a helper module, imported by the fixture below.
sys.path.insert(0, str(Path(__file__).parent))


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


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (see tests/postgres_server.py); skips only without its binaries.

    The driver is no reason to skip: ``.[test]`` installs psycopg, so its absence is an error.
    """
    from postgres_server import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server: its postgresql:// URL, password included."""
    return postgres_server.create_database()
