"""Grouping a dataset prefix's keys into ordered shards and the train/validation split."""

from __future__ import annotations

import pytest

from tplr.comms.manifest import Manifest, ManifestEntry
from tplr.data.layout import DatasetLayoutError, group_shards, plan_layout


def templar_keys(numbers, prefix="remote/tokenized/"):
    keys = []
    for n in numbers:
        keys += [f"{prefix}train_{n:06d}.npy", f"{prefix}sample_ids_{n:06d}.bin"]
    return keys


def test_templar_shards_are_paired_and_ordered_by_number():
    keys = [*templar_keys([10, 2, 0, 1]), "remote/tokenized/manifest.json"]
    layout = plan_layout(reversed(keys))
    assert [s.index for s in layout.train] == [0, 1, 2]
    assert [s.index for s in layout.val] == [10]  # the last shard is held out
    first = layout.train[0]
    assert first.format == "templar"
    assert first.keys == (
        "remote/tokenized/train_000000.npy",
        "remote/tokenized/sample_ids_000000.bin",
    )
    assert layout.ignored == ("remote/tokenized/manifest.json",)
    assert layout.train_shard(4).index == 1  # schedule position wraps over train shards


def test_llmc_shards_with_k_validation_shards():
    keys = [f"edu_fineweb_train_{n:06d}.bin" for n in range(1, 6)]
    layout = plan_layout(keys, val_shards=2)
    assert [s.index for s in layout.train] == [1, 2, 3]
    assert [s.tokens_key for s in layout.val] == [
        "edu_fineweb_train_000004.bin",
        "edu_fineweb_train_000005.bin",
    ]
    assert all(s.format == "llmc" and s.ids_key is None for s in layout.train)
    assert plan_layout(keys, val_shards=0).val == ()


def test_files_named_val_are_the_validation_split():
    keys = ["fineweb_val_000000.bin"] + [f"fineweb_train_{n:06d}.bin" for n in (1, 2, 3)]
    layout = plan_layout(keys)
    assert [s.tokens_key for s in layout.val] == ["fineweb_val_000000.bin"]
    assert [s.index for s in layout.train] == [1, 2, 3]  # nothing else held out
    # the shard manager's view: train shards in order, val ones last
    assert group_shards(keys)[-1] == ("fineweb_val_000000.bin",)
    assert group_shards(keys)[0] == ("fineweb_train_000001.bin",)


def test_val_shards_from_the_manifest_dataset_section():
    keys = templar_keys(range(5), prefix="")
    entries = {k: ManifestEntry(size=0, parts=[]) for k in keys}
    manifest = Manifest(files=entries, dataset={"val_shards": 3})
    assert len(plan_layout(keys, manifest=manifest).val) == 3
    assert len(plan_layout(keys, manifest=manifest, val_shards=1).val) == 1  # flag wins


def test_manifest_formats_override_names():
    keys = ["data_000000.bin", "data_000001.bin"]
    manifest = Manifest(files={k: ManifestEntry(size=0, parts=[], format="llmc") for k in keys})
    layout = plan_layout(["pre/" + k for k in keys], manifest=manifest, manifest_prefix="pre/")
    assert layout.format == "llmc"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["train_000000.npy"], "has no sample_ids_000000.bin beside it"),
        ([*templar_keys([0, 1]), "sample_ids_000007.bin"], "sample ids without a tokens file"),
        ([*templar_keys([0]), "x_000001.bin"], "mixes templar (.npy) and llm.c (.bin)"),
        (["a_train_000001.bin", "b_train_000001.bin"], "two train shards numbered 1"),
        (["manifest.json", "notes.txt"], "no shard files found"),
        (templar_keys([0]), "leaves no training shard (1 shard(s) found)"),
        (["fineweb_val_000000.bin"], "only validation shards"),
    ],
)
def test_layout_errors_say_what_is_wrong(keys, message):
    with pytest.raises(DatasetLayoutError) as info:
        plan_layout(keys)
    assert message in str(info.value)
    assert info.value.hint


def test_negative_val_shards_is_rejected():
    with pytest.raises(DatasetLayoutError, match="val_shards must be >= 0"):
        plan_layout(templar_keys([0, 1]), val_shards=-1)


def test_temporary_and_foreign_files_are_ignored():
    keys = [*templar_keys([0, 1]), "train_000002.npy.tmp", "README.md"]
    layout = plan_layout(keys)
    assert set(layout.ignored) == {"train_000002.npy.tmp", "README.md"}
    assert len(layout.train) + len(layout.val) == 2
