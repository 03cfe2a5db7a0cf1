"""Who is in the run: the operator's peers file, node announcements, published peer lists.

- ``PEERS_FILE`` (YAML or JSON) lists each peer's uid, role, gradients bucket and the
  read-only key to it. Validation errors name the file, the entry and the field; secrets
  are ``SecretStr`` and never appear in ``repr``, logs or errors.
- With the embedded (shared) store, nodes announce themselves as ``nodes/{uid}.json``.
- The validator publishes the peer list for the next window as ``peers/{w}.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from tplr.comms.config import BucketConfig
from tplr.comms.errors import NotFound
from tplr.comms.stores.base import ObjectStore
from tplr.errors import ConfigError
from tplr.untrusted import MalformedInput, load_model

log = logging.getLogger(__name__)

Role = Literal["miner", "validator"]
NODES_PREFIX = "nodes/"
PEER_LISTS_PREFIX = "peers/"
_PEER_LIST_KEY = re.compile(r"^peers/(\d+)\.json$")
MAX_ANNOUNCEMENT_BYTES = 4096
MAX_PEER_LIST_BYTES = 1 << 20
MAX_PEERS = 1 << 16


class PeersFileError(ConfigError):
    """The peers file is unreadable or an entry is invalid."""

    def __init__(
        self, message: str, *, path: str, entry: str | None = None, field: str | None = None
    ) -> None:
        where = path + (f", {entry}" if entry else "") + (f", field {field!r}" if field else "")
        super().__init__(
            f"peers file {where}: {message}",
            hint="fix the entry in PEERS_FILE; each needs uid, role, bucket_name, "
            "account_id or endpoint_url, read_access_key_id, read_secret_access_key",
        )
        self.path = path
        self.entry = entry
        self.field = field


class PeerEntry(BaseModel):
    """One peer: where its gradients live and the read-only key to them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uid: int = Field(ge=0, lt=1 << 31)
    role: Role
    bucket_name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    account_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9]{1,64}$")
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    prefix: str = Field(default="", description="key prefix inside the bucket")
    read_access_key_id: SecretStr
    read_secret_access_key: SecretStr

    @field_validator("read_access_key_id", "read_secret_access_key")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError("must be a relative key prefix without '..'")
        return value

    @model_validator(mode="after")
    def _has_location(self) -> PeerEntry:
        if not (self.account_id or self.endpoint_url):
            raise ValueError("needs account_id (Cloudflare R2) or endpoint_url")
        return self

    def bucket_config(self) -> BucketConfig:
        """The read-only bucket settings for fetching this peer's gradients."""
        return BucketConfig(
            bucket_name=self.bucket_name,
            access_key_id=self.read_access_key_id,
            secret_access_key=self.read_secret_access_key,
            account_id=self.account_id,
            endpoint_url=self.endpoint_url,
        )


def _load_document(text: str, path: str) -> Any:
    is_json = path.lower().endswith(".json") or text.lstrip().startswith(("[", "{"))
    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise PeersFileError(f"invalid JSON at line {exc.lineno}: {exc.msg}", path=path) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PeersFileError(f"invalid YAML{line}: {problem}", path=path) from exc


def _entries_of(document: Any, path: str) -> list[Any]:
    if isinstance(document, dict) and set(document) == {"peers"}:
        document = document["peers"]
    if not isinstance(document, list):
        raise PeersFileError(
            "expected a list of peers (or a mapping with a 'peers' list), "
            f"got {type(document).__name__}",
            path=path,
        )
    return document


def _parse_entry(raw: Any, index: int, path: str) -> PeerEntry:
    uid = raw.get("uid") if isinstance(raw, dict) else None
    entry = f"entry {index}" + (f" (uid {uid})" if uid is not None else "")
    if not isinstance(raw, dict):
        raise PeersFileError(
            f"expected a mapping, got {type(raw).__name__}", path=path, entry=entry
        )
    try:
        return PeerEntry.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or None
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        raise PeersFileError(message, path=path, entry=entry, field=field) from None


def parse_peers(text: str, *, path: str) -> list[PeerEntry]:
    """Parse a peers document (YAML or JSON); ``path`` names it in errors."""
    entries = _entries_of(_load_document(text, path), path)
    peers: list[PeerEntry] = []
    seen: dict[int, int] = {}
    for index, raw in enumerate(entries):
        peer = _parse_entry(raw, index, path)
        if peer.uid in seen:
            raise PeersFileError(
                f"uid {peer.uid} is listed twice (also entry {seen[peer.uid]})",
                path=path,
                entry=f"entry {index} (uid {peer.uid})",
                field="uid",
            )
        seen[peer.uid] = index
        peers.append(peer)
    return sorted(peers, key=lambda peer: peer.uid)


def load_peers_file(path: Path | str) -> list[PeerEntry]:
    """Read and validate ``PEERS_FILE``. Blocking: call it via :func:`load_peers_file_async`
    from the event loop."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PeersFileError(f"cannot read it: {exc.strerror or exc}", path=str(path)) from exc
    return parse_peers(text, path=str(path))


async def load_peers_file_async(path: Path | str) -> list[PeerEntry]:
    return await asyncio.to_thread(load_peers_file, path)


class NodeAnnouncement(BaseModel):
    """``nodes/{uid}.json`` in the embedded store: a node says who it is and where it writes."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    uid: int = Field(ge=0, lt=1 << 31)
    role: Role
    prefix: str = Field(default="", max_length=256)
    code_version: str = Field(default="", max_length=64)
    announced_at_s: float = Field(ge=0)


def parse_announcement(data: bytes, *, source: str) -> NodeAnnouncement:
    """An announcement (outside data); ``ValueError`` subclasses only via ConfigError."""
    try:
        return load_model(
            data, NodeAnnouncement, what=source, max_bytes=MAX_ANNOUNCEMENT_BYTES, max_depth=2
        )
    except MalformedInput as exc:
        raise ConfigError(f"not a node announcement: {exc.message}") from None


def node_key(uid: int) -> str:
    return f"{NODES_PREFIX}{uid}.json"


async def announce_node(store: ObjectStore, announcement: NodeAnnouncement) -> None:
    await store.put(node_key(announcement.uid), announcement.model_dump_json().encode())


async def discover_nodes(store: ObjectStore) -> list[NodeAnnouncement]:
    """Every valid announcement, by uid. An invalid one is logged and skipped: one broken
    node must not hide the others."""
    found: list[NodeAnnouncement] = []
    async for info in store.list(NODES_PREFIX):
        if info.size > MAX_ANNOUNCEMENT_BYTES:
            log.warning("ignoring %s: %d bytes is no announcement", store.url(info.key), info.size)
            continue
        try:
            data = await store.get(info.key)
            announcement = parse_announcement(data, source=store.url(info.key))
        except NotFound:
            continue  # deleted between list and get
        except ConfigError as exc:
            log.warning("ignoring invalid node announcement %s: %s", store.url(info.key), exc)
            continue
        if info.key != node_key(announcement.uid):
            log.warning("ignoring %s: it announces uid %d", store.url(info.key), announcement.uid)
            continue
        found.append(announcement)
    return sorted(found, key=lambda node: node.uid)


class PeerList(BaseModel):
    """The miners whose gradients everyone gathers in ``window`` (published by a validator)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: int = Field(ge=0, lt=1 << 40)
    uids: tuple[int, ...] = Field(max_length=MAX_PEERS)
    published_by: int = Field(ge=0, lt=1 << 31)

    @field_validator("uids")
    @classmethod
    def _sorted_unique(cls, uids: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(uids)) != len(uids):
            raise ValueError("uids must be unique")
        return tuple(sorted(uids))


def peer_list_key(window: int) -> str:
    return f"{PEER_LISTS_PREFIX}{window}.json"


async def publish_peer_list(store: ObjectStore, peer_list: PeerList) -> None:
    await store.put(peer_list_key(peer_list.window), peer_list.model_dump_json().encode())


def parse_peer_list(data: bytes, *, source: str) -> PeerList:
    """A published peer list (outside data: bounded, strict); ConfigError when invalid."""
    hint = "the validator that published it is faulty; ask its operator"
    try:
        return load_model(data, PeerList, what=source, max_bytes=MAX_PEER_LIST_BYTES, max_depth=2)
    except MalformedInput as exc:
        raise ConfigError(f"invalid peer list: {exc.message}", hint=hint) from None


async def read_peer_list(store: ObjectStore, window: int) -> PeerList:
    """The peer list for ``window``; ``NotFound`` if the validator has not published it."""
    key = peer_list_key(window)
    info = await store.head(key)
    if info.size > MAX_PEER_LIST_BYTES:
        raise ConfigError(f"{store.url(key)} is {info.size} bytes: too large for a peer list")
    return parse_peer_list(await store.get(key), source=store.url(key))


async def read_latest_peer_list(store: ObjectStore, *, at_or_before: int) -> PeerList:
    """The newest published peer list for a window ``<= at_or_before``; ``NotFound`` if none."""
    windows = [
        int(match.group(1))
        async for info in store.list(PEER_LISTS_PREFIX)
        if (match := _PEER_LIST_KEY.match(info.key))
    ]
    eligible = [window for window in windows if window <= at_or_before]
    if not eligible:
        raise NotFound(
            f"no peer list at or before window {at_or_before} under {store.url(PEER_LISTS_PREFIX)}",
            location=store.url(PEER_LISTS_PREFIX),
            hint="wait for the lead validator to publish one",
        )
    return await read_peer_list(store, max(eligible))
