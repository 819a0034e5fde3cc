"""Fixtures shared by the adversarial tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from core.db import get_engine
from tests.utils.stack import StackInfo


@pytest.fixture
def statements(stack: StackInfo) -> Iterator[list[str]]:
    """Every SQL statement sent through the stack's engine while the test runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = get_engine(stack.settings)
    sa.event.listen(engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", record)
