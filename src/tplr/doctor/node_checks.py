"""The run and the node as the network sees them: run.json, peers, GPU fit, last upload,
score and peer-list membership (read from the buckets, as any peer would)."""

from __future__ import annotations

import asyncio
import re

from tplr.comms.errors import NotFound
from tplr.comms.stores.base import ObjectStore
from tplr.doctor.probes import gpu_summary, rough_training_memory_bytes
from tplr.doctor.report import CheckResult, fail, ok, skip, warn
from tplr.errors import TplrError
from tplr.node.network.peers import read_latest_peer_list
from tplr.node.network.run_spec import read_run_spec
from tplr.node.process.settings import NodeSettings
from tplr.node.scoring import read_scores
from tplr.protocol.clock import Clock
from tplr.protocol.run_spec import RUN_SPEC_KEY, RunSpec, RunSpecConflict, check_local_overrides
from tplr.units import format_size

_PAYLOAD_KEY = re.compile(r"^gradients/(\d+)/(\d+)\.safetensors$")
_SCORES_KEY = re.compile(r"^scores/(\d+)\.json$")
RECENT_WINDOWS = 3


async def check_run(
    settings: NodeSettings, lead_store: ObjectStore, lead_uid: int
) -> tuple[list[CheckResult], RunSpec | None]:
    location = lead_store.url(RUN_SPEC_KEY)
    try:
        spec = await read_run_spec(lead_store)
    except NotFound:
        if settings.is_lead:
            return [ok("run.json", f"not created yet: this lead creates {location} at start")], None
        return [warn("run.json", f"not at {location} yet (lead uid {lead_uid} creates it)")], None
    try:
        check_local_overrides(spec, settings.run.given(), source=location)
    except RunSpecConflict as exc:
        return [fail("run.json", f"{exc.message} ({exc.hint})")], spec
    detail = (
        f"run {spec.run_id} at {location}: model {spec.model}, {spec.window_seconds:g}s windows, "
        "local settings agree"
    )
    return [ok("run.json", detail)], spec


def check_gpu(settings: NodeSettings, spec: RunSpec | None) -> CheckResult:
    device = settings.node.device
    count, devices = gpu_summary()
    if count == 0:
        if device == "cpu":
            return ok("gpu", "TPLR_DEVICE=cpu: no GPU needed")
        if device == "cuda":
            return fail("gpu", "TPLR_DEVICE=cuda but no CUDA GPU is visible (nvidia-smi?)")
        return warn("gpu", "no CUDA GPU visible: TPLR_DEVICE=auto would train on the CPU")
    smallest = min(total for _, total in devices)
    names = ", ".join(sorted({name for name, _ in devices}))
    seen = f"{count} GPU(s): {names}, {format_size(smallest)} each"
    if spec is None:
        return ok("gpu", f"{seen} (no run.json yet: model size unknown)")
    needed = model_memory_estimate(spec)
    detail = f"{seen}; the {spec.model} model needs about {format_size(needed)} (local estimate)"
    if needed > smallest:
        return fail("gpu", f"{detail}: too little GPU memory")
    return ok("gpu", detail)


def model_memory_estimate(spec: RunSpec) -> int:
    import torch

    from tplr.train.config import ModelConfig
    from tplr.train.model.gpt import GPT, count_parameters

    config = ModelConfig.preset(spec.model, vocab_size=spec.vocab_size)
    with torch.device("meta"):
        parameters = count_parameters(GPT(config))
    return rough_training_memory_bytes(
        parameters,
        tokens_per_micro_batch=spec.micro_batch_size * spec.sequence_length,
        d_model=config.d_model,
        n_layer=config.n_layer,
    )


async def check_running_node(
    settings: NodeSettings, spec: RunSpec, own: ObjectStore, lead_store: ObjectStore, clock: Clock
) -> list[CheckResult]:
    window = spec.window_clock(clock).current_window()
    uid = settings.node.uid
    if settings.role == "miner":
        results = [await _last_upload(own, uid, window)]
    else:
        results = [await _last_scores(own, window)]
    results.append(await _score_of(lead_store, uid, settings.role))
    results.append(await _peer_list_membership(lead_store, uid, window, settings.role))
    return results


def _age(window: int, last: int) -> str:
    return f"window {last}, {window - last} window(s) ago (now {window})"


async def _last_upload(own: ObjectStore, uid: int, window: int) -> CheckResult:
    windows = [
        int(match.group(1))
        async for info in own.list("gradients/")
        if (match := _PAYLOAD_KEY.match(info.key)) and int(match.group(2)) == uid
    ]
    if not windows:
        return warn("last upload", f"no payload of uid {uid} in {own.url('gradients/')} yet")
    last = max(windows)
    status = ok if window - last <= RECENT_WINDOWS else warn
    return status("last upload", _age(window, last))


async def _last_scores(own: ObjectStore, window: int) -> CheckResult:
    windows = [
        int(m.group(1)) async for i in own.list("scores/") if (m := _SCORES_KEY.match(i.key))
    ]
    if not windows:
        return warn("last scores", f"none published in {own.url('scores/')} yet")
    last = max(windows)
    status = ok if window - last <= RECENT_WINDOWS else warn
    return status("last scores", _age(window, last))


async def _score_of(lead_store: ObjectStore, uid: int, role: str) -> CheckResult:
    if role != "miner":
        return skip("score", "validators are not scored")
    windows = [
        int(m.group(1)) async for i in lead_store.list("scores/") if (m := _SCORES_KEY.match(i.key))
    ]
    if not windows:
        return warn("score", f"the lead has published no scores in {lead_store.url('scores/')}")
    try:
        board = await read_scores(lead_store, max(windows))
    except TplrError as exc:
        return warn("score", f"cannot read the lead's scores: {exc.message}")
    score = board.scores().get(uid)
    if score is None:
        return warn("score", f"uid {uid} is not in the lead's scores of window {board.window}")
    return ok("score", f"{score:.5f} in the lead's scores of window {board.window}")


async def _peer_list_membership(
    lead_store: ObjectStore, uid: int, window: int, role: str
) -> CheckResult:
    if role != "miner":
        return skip("peer list", "validators are not in peer lists")
    try:
        peers = await read_latest_peer_list(lead_store, at_or_before=window + 1)
    except NotFound as exc:
        return warn("peer list", exc.message)
    if uid in peers.uids:
        return ok("peer list", f"uid {uid} is in the peer list of window {peers.window}")
    return warn(
        "peer list",
        f"uid {uid} is not in the peer list of window {peers.window} ({len(peers.uids)} peers)",
    )


async def lead_uid_of(settings: NodeSettings, directory) -> int | None:
    if settings.is_lead:
        return settings.node.uid
    if settings.node.lead_uid is not None:
        return settings.node.lead_uid
    validators = await directory.validators()
    return min(validators) if validators else None


async def to_thread_check(function, *args) -> CheckResult:
    return await asyncio.to_thread(function, *args)
