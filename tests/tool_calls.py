"""Calling a verl tool from a test the way verl's tool agent loop calls it."""

from __future__ import annotations

import asyncio


def call(tool, parameters, create_kwargs: dict | None = None) -> str:
    """One tool call as the loop makes it: create, execute, release; returns the answer text."""

    async def lifecycle() -> str:
        instance_id, _ = await tool.create(create_kwargs=create_kwargs or {})
        try:
            response, reward, metrics = await tool.execute(instance_id, parameters, agent_data=None)
        finally:
            await tool.release(instance_id)
        assert (reward, metrics) == (0.0, {})
        return response.text

    return asyncio.run(lifecycle())
