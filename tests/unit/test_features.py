"""The image feature table: ids that never repeat for different images, LRU eviction of unused
entries only, and an embedding that reads the table past the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.features import FeatureEmbedding, FeatureTable


def _table(capacity: int = 10, vocab: int = 100) -> FeatureTable:
    return FeatureTable(capacity, 4, vocab, torch.float32, torch.device("cpu"))


def test_same_digest_same_ids_and_one_encoding():
    table = _table()
    first, new = table.acquire("a", 3)
    again, new_again = table.acquire("a", 3)
    assert new and not new_again and again is first
    assert all(i >= 100 for i in first.ids) and len(set(first.ids)) == 3
    assert table.stats()["image_encodings_requested"] == 2 and table.stats()["image_encodings_run"] == 1


def test_only_unused_entries_are_evicted_least_recently_used_first():
    table = _table(capacity=6)
    a, _ = table.acquire("a", 3)
    b, _ = table.acquire("b", 3)
    for entry in (a, b):
        table.publish(entry, torch.ones(3, 4))
    assert table.acquire("c", 3) is None  # both still referenced
    table.release(b)
    table.release(a)  # a is now the most recently used
    c, new = table.acquire("c", 3)
    assert new and "b" not in table._entries and "a" in table._entries
    assert table.stats()["image_cache_evictions"] == 1


def test_a_reused_row_gets_an_id_it_never_had():
    table = _table(capacity=3)
    seen = set()
    for k in range(20):
        entry, _ = table.acquire(f"img{k}", 3)
        assert not seen & set(entry.ids)
        seen |= set(entry.ids)
        table.publish(entry, torch.zeros(3, 4))
        table.release(entry)


def test_epochs_run_out_then_a_restart_is_asked_for():
    table = FeatureTable(2, 4, 2**31 - 8, torch.float32, torch.device("cpu"))  # room for 2 epochs
    for k in range(2):
        entry, _ = table.acquire(f"img{k}", 2)
        table.publish(entry, torch.zeros(2, 4))
        table.release(entry)
    assert table.acquire("img9", 2) is None and table.restart_pending
    table.restart()
    assert table.acquire("img9", 2) is not None and not table.restart_pending


def test_a_failed_encoding_is_not_handed_out_again():
    table = _table()
    entry, _ = table.acquire("a", 2)
    table.fail(entry, "boom")
    retry, new = table.acquire("a", 2)
    assert new and retry is not entry and entry.error == "boom"
    table.release(entry)
    assert table.stats()["image_cache_rows_used"] == 2  # only the retry's rows


def test_too_big_for_the_table_is_an_error():
    with pytest.raises(ValueError, match="image-cache-mb"):
        _table(capacity=4).acquire("a", 5)


def test_the_embedding_reads_vocabulary_ids_and_table_rows():
    base = torch.nn.Embedding(100, 4)
    table = _table(capacity=10)
    entry, _ = table.acquire("a", 2)
    features = torch.arange(8, dtype=torch.float32).view(2, 4)
    table.publish(entry, features)
    embed = FeatureEmbedding(base, table.tensor, 100)
    ids = torch.tensor([[5, entry.ids[0], 7, entry.ids[1]]])
    out = embed(ids)
    assert torch.equal(out[0, 0], base.weight[5]) and torch.equal(out[0, 2], base.weight[7])
    assert torch.equal(out[0, 1], features[0]) and torch.equal(out[0, 3], features[1])
    assert np.array_equal(np.sort(entry.rows), entry.rows)
