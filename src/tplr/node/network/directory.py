"""Where peers' objects live: the peers file (R2/S3) or the embedded store's announcements.

A :class:`PeerDirectory` answers three questions: which uids are miners, which are
validators, and which store holds a uid's objects (read-only for others). A node's own
uid always maps to its own (writable) store.

- :class:`PeersFileDirectory`: the operator's ``PEERS_FILE`` (reloaded when it changes);
  one S3 client per peer bucket, opened on first use with that peer's read key.
- :class:`EmbeddedDirectory`: every node of the embedded store lives under
  ``uids/{uid}/`` of one shared local store and announces itself as ``nodes/{uid}.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Protocol

from tplr.comms.stores.base import ObjectStore
from tplr.comms.stores.s3 import S3Store
from tplr.comms.transfer_config import TransferConfig
from tplr.errors import TplrError
from tplr.node.network.peers import PeerEntry, PeersFileError, discover_nodes, load_peers_file
from tplr.node.network.prefixed_store import PrefixedStore

log = logging.getLogger(__name__)


class UnknownPeer(TplrError):
    """A uid has no known location (not in the peers file, never announced)."""

    hint = "add the uid to PEERS_FILE (or check that the node ever started)"


class PeerDirectory(Protocol):
    async def miners(self) -> list[int]: ...

    async def validators(self) -> list[int]: ...

    async def store_for(self, uid: int) -> ObjectStore: ...


def embedded_prefix(uid: int) -> str:
    """Where a node's objects live inside the embedded shared store."""
    return f"uids/{uid}/"


class EmbeddedDirectory:
    """Peers of the embedded store: announcements in ``nodes/``, objects under ``uids/``."""

    def __init__(self, shared: ObjectStore, *, own_uid: int, own_store: ObjectStore) -> None:
        self.shared = shared
        self.own_uid = own_uid
        self.own_store = own_store

    async def _uids(self, role: str) -> list[int]:
        return [node.uid for node in await discover_nodes(self.shared) if node.role == role]

    async def miners(self) -> list[int]:
        return await self._uids("miner")

    async def validators(self) -> list[int]:
        return await self._uids("validator")

    async def store_for(self, uid: int) -> ObjectStore:
        if uid == self.own_uid:
            return self.own_store
        return PrefixedStore(self.shared, embedded_prefix(uid))


def _peer_identity(entry: PeerEntry) -> tuple:
    """What a client to a peer depends on, credentials included (as a digest: rotated keys
    open a new client; the secret itself is never kept in the key)."""
    keys = hashlib.blake2b(digest_size=16)
    keys.update(entry.read_access_key_id.get_secret_value().encode())
    keys.update(b"\0" + entry.read_secret_access_key.get_secret_value().encode())
    location = (entry.bucket_name, entry.prefix, entry.endpoint_url, entry.account_id)
    return (entry.uid, *location, keys.hexdigest())


class PeersFileDirectory:
    """Peers from ``PEERS_FILE``; reloaded when its modification time changes.

    A file that breaks while the node runs (a half-written edit, a typo) is logged and the
    last good list is kept; at start-up it is an error. One S3 client per peer, replaced
    (the old one closed) when the peer's bucket, endpoint or keys change in the file."""

    def __init__(
        self,
        path: Path,
        *,
        own_uid: int,
        own_store: ObjectStore,
        transfer: TransferConfig,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.path = Path(path)
        self.own_uid = own_uid
        self.own_store = own_store
        self._transfer = transfer
        self._stack = stack
        self._entries: dict[int, PeerEntry] = {}
        self._mtime_ns: int | None = None
        self._clients: dict[int, tuple[tuple, ObjectStore, contextlib.AsyncExitStack]] = {}
        stack.push_async_callback(self._close_clients)

    async def refresh(self) -> None:
        """(Re)load the file if it changed since the last read."""
        mtime_ns = await asyncio.to_thread(lambda: self.path.stat().st_mtime_ns)
        if mtime_ns == self._mtime_ns:
            return
        entries = await asyncio.to_thread(load_peers_file, self.path)
        self._entries = {entry.uid: entry for entry in entries}
        self._mtime_ns = mtime_ns
        log.info("peers file %s: %d peer(s)", self.path, len(entries))

    async def _entries_now(self) -> dict[int, PeerEntry]:
        try:
            await self.refresh()
        except (OSError, PeersFileError) as exc:  # being rewritten, or broken: keep the last
            log.warning("cannot re-read peers file %s (%s); using the last list", self.path, exc)
        return self._entries

    async def miners(self) -> list[int]:
        return sorted(u for u, e in (await self._entries_now()).items() if e.role == "miner")

    async def validators(self) -> list[int]:
        return sorted(u for u, e in (await self._entries_now()).items() if e.role == "validator")

    async def store_for(self, uid: int) -> ObjectStore:
        if uid == self.own_uid:
            return self.own_store
        entry = (await self._entries_now()).get(uid)
        if entry is None:
            raise UnknownPeer(f"uid {uid} is not in the peers file {self.path}")
        identity = _peer_identity(entry)
        current = self._clients.get(uid)
        if current is not None and current[0] == identity:
            return current[1]
        client_stack = contextlib.AsyncExitStack()
        opened = await client_stack.enter_async_context(
            S3Store(entry.bucket_config(), self._transfer, max_connections=8)
        )
        store = PrefixedStore(opened, entry.prefix) if entry.prefix else opened
        self._clients[uid] = (identity, store, client_stack)
        if current is not None:  # bucket, endpoint or keys changed: the old client goes
            log.info("peer %d changed in the peers file: using its new bucket settings", uid)
            await current[2].aclose()
        return store

    async def _close_clients(self) -> None:
        clients, self._clients = self._clients, {}
        for _, _, client_stack in clients.values():
            await client_stack.aclose()
