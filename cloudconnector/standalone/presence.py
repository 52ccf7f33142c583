"""Live connection status in the standalone mode: the proxy's writes go to the state store, where
``cloud-connector status`` shows them in the same CONNECTED and LAST SEEN columns kubectl does."""

from __future__ import annotations

import asyncio

from cloudconnector.model import ObjectRef
from cloudconnector.proxy.presence import ConnectionStatus
from cloudconnector.standalone.store import StateStore


class StorePresenceSink:
    """:class:`~cloudconnector.proxy.presence.PresenceSink` over the state store. One process
    serves every device here, so an ended session never races another proxy's newer one."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def write(self, device: ObjectRef, status: ConnectionStatus) -> None:
        await asyncio.to_thread(self.store.set_connection, device, dict(status))

    async def write_ended(self, device: ObjectRef, status: ConnectionStatus, proxy: str) -> bool:
        return await asyncio.to_thread(self.store.set_connection, device, dict(status))
