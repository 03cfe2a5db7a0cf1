"""Dishonest miners for the network tests: real Miner subclasses that deviate at one hook.

Nothing of the code under test is replaced: each adversary trains (or not), commits and
reveals through the same stores and clocks as an honest miner, and lies where it says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import struct

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from tplr.comms.errors import NotFound
from tplr.comms.upload import upload_bytes
from tplr.node.miner import Miner
from tplr.node.network.approvals import read_approval
from tplr.protocol.aggregation import weighted_sum
from tplr.protocol.approval import mirror_key
from tplr.protocol.assignment import assignment_for
from tplr.protocol.commitments import Commitment, commit_to, commitment_key
from tplr.protocol.payload import (
    INDEX_SUFFIX,
    VALUES_SUFFIX,
    PayloadMeta,
    payload_key,
)
from tplr.protocol.reasons import RejectReason
from tplr.train.compression import CompressedTensor, ErrorFeedbackCompressor, decompress_all


def scaled(compressed: dict[str, CompressedTensor], factor: float) -> dict[str, CompressedTensor]:
    return {
        name: dataclasses.replace(part, values=(part.values.float() * factor).to(part.values.dtype))
        for name, part in compressed.items()
    }


def random_payload(miner: Miner, assignment, generator: torch.Generator, *, scale=0.01):
    """Random indices and values of about an honest scale, with correct metadata."""
    settings = miner.rt.spec.compression_settings()
    tensors = {}
    for name, shape in miner.rt.schema.param_shapes.items():
        chunks, k = settings.compressed_shape(shape)
        order = torch.rand(chunks, settings.chunk_size, generator=generator).argsort(dim=1)
        values = torch.randn(chunks, k, generator=generator) * scale
        tensors[name] = CompressedTensor(
            indices=order[:, :k].to(settings.index_dtype),
            values=values.to(settings.value_dtype),
            shape=torch.Size(shape),
        )
    return miner.encode(assignment, tensors)


def relabel(miner: Miner, data: bytes, assignment) -> bytes:
    """Another payload's tensors under this miner's uid, window, base and sample digest."""
    tensors = safetensors_load(data)
    meta = PayloadMeta(
        run_id=miner.rt.spec.run_id,
        window=assignment.window,
        uid=miner.rt.uid,
        base_digest=miner.model.digest or "",
        sample_digest=assignment.digest,
        sample_count=assignment.count,
    )
    return safetensors_save(tensors, metadata=meta.to_metadata())


async def previous_approved(miner: Miner, window: int) -> dict[int, bytes]:
    """The lead's copies of the payloads it approved for ``window``."""
    rt = miner.rt
    approval = await read_approval(rt.lead_store, run_id=rt.spec.run_id, window=window)
    return {
        uid: await rt.lead_store.get(mirror_key(window, uid)) for uid in approval.approved_uids()
    }


class NoiseMiner(Miner):
    """Uploads random indices and values of the honest scale (no training)."""

    async def produce_payload(self, dataset, assignment):
        generator = torch.Generator().manual_seed(self.rt.uid * 1000 + assignment.window)
        return random_payload(self, assignment, generator), None


class ZeroMiner(Miner):
    """Uploads an all-zero Δ (a free rider that sends nothing)."""

    async def produce_payload(self, dataset, assignment):
        generator = torch.Generator().manual_seed(assignment.window)
        data = random_payload(self, assignment, generator, scale=0.0)
        return data, None


class SleeperMiner(Miner):
    """Honest until ``turn_at``, then a large harmful Δ (−10 × its honest one)."""

    turn_at = 4

    async def produce_payload(self, dataset, assignment):
        stats, compressed = await asyncio.to_thread(self.train_and_compress, dataset, assignment)
        if assignment.window >= self.turn_at:
            compressed = scaled(compressed, -10.0)
        return await asyncio.to_thread(self.encode, assignment, compressed), stats


class ScaledMiner(Miner):
    """Honest work, sent ×3 (scale is no lever under normalisation)."""

    async def produce_payload(self, dataset, assignment):
        stats, compressed = await asyncio.to_thread(self.train_and_compress, dataset, assignment)
        return await asyncio.to_thread(self.encode, assignment, scaled(compressed, 3.0)), stats


class OtherRowsMiner(Miner):
    """Trains honestly, but on rows assigned to someone else, and claims its own digest."""

    async def produce_payload(self, dataset, assignment):
        other = assignment_for(self.rt.spec, dataset, self.rt.uid + 1000, assignment.window)
        stats, compressed = await asyncio.to_thread(self.train_and_compress, dataset, other)
        return await asyncio.to_thread(self.encode, assignment, compressed), stats


class SameWindowCopier(Miner):
    """Cannot see any payload before the commit deadline, so it commits a guess; in the
    reveal phase it re-uploads honest ``victim``'s fresh payload under its own uid."""

    victim = 1

    async def produce_payload(self, dataset, assignment):
        self.assignment_now = assignment
        return b"nothing yet", None

    async def reveal(self, window, data):
        victim = await self.rt.stores.directory.store_for(self.victim)
        async with asyncio.timeout(60):
            while True:
                try:
                    original = await victim.get(payload_key(window, self.victim))
                    break
                except NotFound:
                    await asyncio.sleep(0.05)
        copy = relabel(self, original, self.assignment_now)
        return await super().reveal(window, copy)


class ReplayMiner(Miner):
    """Re-uploads a payload the lead approved in the previous window, relabelled."""

    async def produce_payload(self, dataset, assignment):
        try:
            approved = await previous_approved(self, assignment.window - 1)
        except NotFound:
            approved = {}
        if not approved:
            generator = torch.Generator().manual_seed(assignment.window)
            return random_payload(self, assignment, generator), None
        return relabel(self, approved[min(approved)], assignment), None


class CopyPreviousWithNoise(Miner):
    """The previous window's approved Δ of another miner, noised (defeats exact matching)."""

    async def produce_payload(self, dataset, assignment):
        try:
            approved = await previous_approved(self, assignment.window - 1)
        except NotFound:
            approved = {}
        generator = torch.Generator().manual_seed(self.rt.uid + assignment.window)
        if not approved:
            return random_payload(self, assignment, generator), None
        tensors = safetensors_load(approved[max(approved)])
        for name, tensor in tensors.items():
            if name.endswith(VALUES_SUFFIX):
                noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std()
                tensors[name] = (tensor.float() + noise).to(tensor.dtype)
        return relabel(self, safetensors_save(tensors), assignment), None


class PreviousAggregateMiner(Miner):
    """Re-uploads the previous window's aggregate, top-k compressed (no training)."""

    async def produce_payload(self, dataset, assignment):
        rt = self.rt
        try:
            approval = await read_approval(
                rt.lead_store, run_id=rt.spec.run_id, window=assignment.window - 1
            )
            approved = await previous_approved(self, assignment.window - 1)
        except NotFound:
            approved = {}
        generator = torch.Generator().manual_seed(assignment.window)
        if not approved:
            return random_payload(self, assignment, generator), None
        settings = rt.spec.compression_settings()
        deltas = {}
        for uid, data in approved.items():
            tensors = safetensors_load(data)
            parts = {
                name: CompressedTensor(
                    tensors[name + INDEX_SUFFIX],
                    tensors[name + VALUES_SUFFIX],
                    torch.Size(rt.schema.param_shapes[name]),
                )
                for name in rt.schema.param_shapes
            }
            deltas[uid] = decompress_all(parts, settings.chunk_size)
        aggregate, _ = weighted_sum(deltas, approval.weights())
        compressed = ErrorFeedbackCompressor(settings).compress(aggregate)
        return self.encode(assignment, compressed), None


class RevealOther(Miner):
    """Commits to one payload, reveals a different one."""

    async def produce_payload(self, dataset, assignment):
        generator = torch.Generator().manual_seed(assignment.window)
        self.other = random_payload(self, assignment, generator)
        return random_payload(self, assignment, generator), None

    async def reveal(self, window, data):
        return await super().reveal(window, self.other)


class LateCommitter(Miner):
    """Commits only once the reveal phase has opened (after the validators' snapshot)."""

    async def produce_payload(self, dataset, assignment):
        generator = torch.Generator().manual_seed(assignment.window)
        return random_payload(self, assignment, generator), None

    async def commit(self, window, commitment: Commitment) -> bool:
        rt = self.rt
        reached, _ = await rt.shutdown.unless_stopped(
            rt.windows.sleep_until(rt.windows.reveal_open_s(window))
        )
        if not reached:
            return False
        await upload_bytes(
            rt.stores.own, commitment.to_json(), commitment_key(window, rt.uid), config=rt.transfer
        )
        return True


class NeverReveals(Miner):
    """Commits, then never uploads the payload."""

    async def produce_payload(self, dataset, assignment):
        generator = torch.Generator().manual_seed(assignment.window)
        return random_payload(self, assignment, generator), None

    async def reveal(self, window, data):
        return 0


class BadCommitment(Miner):
    """Writes a hostile commitment object (deep nesting) in time."""

    async def produce_payload(self, dataset, assignment):
        generator = torch.Generator().manual_seed(assignment.window)
        return random_payload(self, assignment, generator), None

    async def commit(self, window, commitment: Commitment) -> bool:
        rt = self.rt
        hostile = b"[" * 3000 + b"]" * 3000
        await upload_bytes(
            rt.stores.own, hostile, commitment_key(window, rt.uid), config=rt.transfer
        )
        return True


# -- malformed payloads (issue 10: every class is a rejection, never a crash) -------------------
def deep_header() -> bytes:
    header = b'{"__metadata__": {}, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return struct.pack("<Q", len(header)) + header


MALFORMED_CLASSES = (
    RejectReason.NOT_SAFETENSORS,  # a pickle named .safetensors
    RejectReason.BAD_SHAPE,
    RejectReason.NON_FINITE,
    RejectReason.INDEX_OUT_OF_RANGE,
    RejectReason.TOO_LARGE,
    RejectReason.WRONG_WINDOW,
    RejectReason.BAD_METADATA,  # window "²"
    RejectReason.PROTOCOL_VERSION,  # a v1 payload
    RejectReason.WRONG_BASE,
    RejectReason.DIGEST_MISMATCH,
)
"""Cycled through, one per window; the deep-nesting header comes with ``NOT_SAFETENSORS``."""


class MalformedMiner(Miner):
    """Commits to (and reveals) one malformed payload per window, cycling the classes."""

    offset = 0

    def kind_for(self, window: int) -> RejectReason:
        return MALFORMED_CLASSES[(window + self.offset) % len(MALFORMED_CLASSES)]

    async def produce_payload(self, dataset, assignment):
        return self.malformed(assignment, self.kind_for(assignment.window)), None

    def malformed(self, assignment, kind: RejectReason) -> bytes:
        if kind is RejectReason.NOT_SAFETENSORS:
            if assignment.window % 2:
                return deep_header()
            buffer = io.BytesIO()
            torch.save({"weights": torch.zeros(4)}, buffer)
            return buffer.getvalue()
        settings = self.rt.spec.compression_settings()
        tensors = {}
        for name, shape in self.rt.schema.param_shapes.items():
            chunks, k = settings.compressed_shape(shape)
            indices = torch.arange(k).repeat(chunks, 1)
            values = torch.full((chunks, k), 1e-3)
            if kind is RejectReason.BAD_SHAPE:
                indices, values = indices[:, :-1], values[:, :-1]
            if kind is RejectReason.NON_FINITE:
                values[0, 0] = float("nan")
            if kind is RejectReason.INDEX_OUT_OF_RANGE:
                indices[0, 0] = settings.chunk_size + 5
            tensors[name + INDEX_SUFFIX] = indices.to(settings.index_dtype)
            tensors[name + VALUES_SUFFIX] = values.to(settings.value_dtype)
        meta = PayloadMeta(
            self.rt.spec.run_id,
            assignment.window,
            self.rt.uid,
            self.model.digest or "",
            assignment.digest,
            assignment.count,
        ).to_metadata()
        if kind is RejectReason.WRONG_WINDOW:
            meta["window"] = str(assignment.window + 1)
        if kind is RejectReason.BAD_METADATA:
            meta["window"] = "²"
        if kind is RejectReason.PROTOCOL_VERSION:
            meta["version"] = "1"
        if kind is RejectReason.WRONG_BASE:
            meta["base_digest"] = "xxh3_128:" + "0" * 32
        if kind is RejectReason.DIGEST_MISMATCH:
            meta["sample_digest"] = "blake2b:" + "0" * 64
        data = safetensors_save(tensors, metadata=meta)
        if kind is RejectReason.TOO_LARGE:
            data += b"\0" * (self.rt.schema.max_bytes + 1)
        return data


class OffsetMalformedMiner(MalformedMiner):
    offset = len(MALFORMED_CLASSES) // 2


def commitment_for(miner: Miner, data: bytes, window: int) -> Commitment:
    return commit_to(data, run_id=miner.rt.spec.run_id, window=window, uid=miner.rt.uid)


def dump(obj) -> str:
    return json.dumps(obj, sort_keys=True)
