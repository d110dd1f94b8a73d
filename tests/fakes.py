"""An in-process Node API for service tests: records calls, answers as told."""

from __future__ import annotations

import asyncio
from collections import deque

from provisioner.nodeapi import CreateOutcome, CreateResult, DeleteOutcome, ListedNode


class FakeNodeApi:
    def __init__(self) -> None:
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.create_outcomes: deque[CreateResult] = deque()
        self.delete_outcome = DeleteOutcome.SENT
        self.listed: list[ListedNode] | None = None
        #: with `listed` None: True, the API has no list (404, 405), as the tests that give
        #: none mean; False, it failed to give one (unreachable, a timeout, a 5xx), which
        #: holds a young pool's ticks (Replica._reconcile_if_due)
        self.has_no_list = True
        self.delay = 0.0

    async def create(self) -> CreateResult:
        await asyncio.sleep(self.delay)
        if self.create_outcomes:
            return self.create_outcomes.popleft()
        node_id = f"node-{len(self.created) + 1}"
        self.created.append(node_id)
        return CreateResult(CreateOutcome.CREATED, node_id)

    async def delete(self, node_id: str) -> DeleteOutcome:
        self.deleted.append(node_id)
        return self.delete_outcome

    async def list_nodes(self) -> list[ListedNode] | None:
        return self.listed

    async def aclose(self) -> None:
        return None
