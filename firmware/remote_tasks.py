"""What both remotes (firmware/link_primary.py's LinkRemote and
firmware/control_remote.py's ControlRemote) do alike with their background
tasks and the requests in flight on a sealed channel."""

from __future__ import annotations

import asyncio


async def cancel_tasks(*tasks: asyncio.Future | None) -> None:
    """Cancel each task still running and wait for it to end (shutting down:
    whatever it raises is moot)."""
    for task in tasks:
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass


def fail_pending(pending: dict[int, tuple[asyncio.Future, object]], channel: object, error: Exception) -> None:
    """Fail every request still waiting for a reply on ``channel``."""
    for fut, owner in list(pending.values()):
        if owner is channel and not fut.done():
            fut.set_exception(error)
