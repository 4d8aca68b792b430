"""End-to-end fixtures: one stack environment per flavour (embedded defaults, real services)."""

from __future__ import annotations

import pytest

from sandbox.stacks import StackEnv


@pytest.fixture(params=["embedded", "services"])
def stack(request: pytest.FixtureRequest) -> StackEnv:
    """The environment of a whole deployment: embedded defaults, or PostgreSQL + Redis + S3."""
    name = "embedded_stack" if request.param == "embedded" else "service_stack"
    env: StackEnv = request.getfixturevalue(name)
    return env
