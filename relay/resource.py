"""The shape every async resource shares: ``async with`` opens it and closes it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncResource:
    """Base of stores and clients used as ``async with``: entering opens, leaving closes."""

    async def open(self) -> None:
        """Acquire what the resource needs (nothing by default)."""

    async def close(self) -> None:
        """Release everything the resource holds."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
