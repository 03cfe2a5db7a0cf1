"""The pure parts of the download engine: part layout, ETag forms and part-size
inference, progress lines, the free-space check."""

from __future__ import annotations

import hashlib
import logging

import pytest

from tplr.comms.diskspace import check_free_space
from tplr.comms.download.etag import (
    file_matches_etag,
    multipart_etag_of,
    parse_md5_etag,
    part_size_candidates,
)
from tplr.comms.download.plan import MiB, auto_part_size, plan_download
from tplr.comms.errors import InsufficientSpace
from tplr.comms.progress import LogProgress, NoProgress, make_progress


@pytest.mark.parametrize(
    ("size", "part", "workers"),
    [
        (0, 1, 1),
        (1, 1, 1),
        (8 * MiB, 8 * MiB, 1),
        (8 * MiB + 1, 8 * MiB, 2),
        (100 * MiB, 8 * MiB, 13),
        (2 * 1024 * MiB, 16 * MiB, 128),
        (100 * 1024 * MiB, 64 * MiB, 128),
    ],
)
def test_default_layout_scales_with_size(size, part, workers):
    plan = plan_download(size)
    assert (plan.part_size, plan.workers) == (part, workers)
    parts = plan.parts()
    assert sum(p.length for p in parts) == size
    assert all(p.offset == i * part for i, p in enumerate(parts))


@pytest.mark.parametrize(
    ("size", "fixed", "piece", "requests"),
    [
        (200 * MiB, 32 * MiB, 8 * MiB, 25),  # a small shard: 25 streams, not 7
        (2048 * MiB, 32 * MiB, 16 * MiB, 128),
        (8192 * MiB, 32 * MiB, 32 * MiB, 256),  # enough parts already: no pieces
        (1024 * MiB, 64 * MiB, 8 * MiB, 128),
        (50 * MiB, 5 * MiB, 5 * MiB, 10),  # never below 8 MiB a request
    ],
)
def test_fixed_parts_are_cut_into_pieces_for_enough_streams(size, fixed, piece, requests):
    plan = plan_download(size, fixed_part_size=fixed)
    assert (plan.part_size, plan.piece_size, plan.request_count) == (fixed, piece, requests)
    assert plan.workers == min(128, requests)
    configured = plan_download(size, part_size=fixed)  # the operator's size is the request
    assert configured.piece_size == fixed


def test_layout_overrides():
    assert plan_download(10 * MiB, part_size=MiB, workers=3).part_count == 10
    assert plan_download(10 * MiB, part_size=MiB, fixed_part_size=4 * MiB).part_size == 4 * MiB
    assert plan_download(10 * MiB, workers=200).workers == 200
    assert auto_part_size(1280 * MiB) == 10 * MiB


def test_etag_forms():
    md5 = hashlib.md5(b"x").hexdigest()
    assert parse_md5_etag(f'"{md5}"').parts is None
    assert parse_md5_etag(f"{md5}-12").parts == 12
    assert parse_md5_etag(f"{md5.upper()}-3").text == f"{md5}-3"
    for unverifiable in ("5f3c-1a2b3c4d", "", f"{md5}-0", 'W/"abc"', md5[:-1]):
        assert parse_md5_etag(unverifiable) is None


def test_part_size_candidates_fit_the_part_count():
    size = 2 * 8 * MiB + 123
    candidates = part_size_candidates(size, 3)
    assert candidates[0] == 8 * MiB
    assert all(2 * p < size <= 3 * p for p in candidates)
    assert part_size_candidates(size, 1) == [size]
    odd = 7 * 7_777_777 + 5  # an uploader with an unusual part size: only derived sizes fit
    assert all(7 * p < odd <= 8 * p for p in part_size_candidates(odd, 8))


def test_file_matches_etag_single_and_multipart(tmp_path):
    data = bytes(range(256)) * (2 * 5 * 4096 + 10)  # 10 MiB + 2560 bytes: 3 parts of 5 MiB
    path = tmp_path / "f"
    path.write_bytes(data)
    single = parse_md5_etag(hashlib.md5(data).hexdigest())
    assert file_matches_etag(path, len(data), single) == len(data)
    part = 5 * MiB
    md5s = [hashlib.md5(data[i : i + part]).hexdigest() for i in range(0, len(data), part)]
    multi = parse_md5_etag(multipart_etag_of(md5s))
    assert multi.parts == 3 and file_matches_etag(path, len(data), multi) == part
    assert file_matches_etag(path, len(data), multi, skip_part_sizes=(part,)) is None
    wrong = parse_md5_etag("0" * 32 + "-3")
    assert file_matches_etag(path, len(data), wrong) is None


def test_free_space_check_names_the_numbers(tmp_path):
    check_free_space(tmp_path, 100, lambda _: 100)
    check_free_space(tmp_path, 0, lambda _: 0)
    with pytest.raises(InsufficientSpace, match="need 101 bytes, 100 bytes free") as err:
        check_free_space(tmp_path, 101, lambda _: 100)
    assert err.value.path == str(tmp_path) and "1 bytes" in err.value.hint


def test_progress_choice_and_log_lines(caplog):
    assert isinstance(make_progress(False), NoProgress)
    assert isinstance(make_progress(None), LogProgress)  # pytest's stderr is not a terminal
    progress = LogProgress(interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="tplr.comms.progress"):
        progress.start("shard.bin", 4 * MiB, MiB)
        progress.advance(MiB)
    assert "shard.bin: 2.00 MiB of 4.00 MiB (50%)" in caplog.text and "ETA" in caplog.text
