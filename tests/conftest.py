"""Shared fixtures: the tiny model pair built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    from tests.tiny_models import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny_pair"))


@pytest.fixture(scope="session")
def tiny_config_path(tiny_pair, tmp_path_factory):
    """A SpecGuard config pointing at the tiny draft (3 grounding layers of the 4-layer target)."""
    path = tmp_path_factory.mktemp("cfg") / "specguard.yaml"
    path.write_text(
        "method: specguard\n"
        f"model: {tiny_pair['draft']}\n"
        "num_speculative_tokens: 8\n"
        "specguard:\n"
        "  num_candidates: 4\n"
        "  seed: 0\n"
    )
    return path
