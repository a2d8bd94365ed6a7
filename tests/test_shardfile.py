"""A node's shard file gives back the loader's tensors with the loader's storage layout."""

import pytest
import torch

from trainer.shardfile import load_shard, save_shard


def _layout(tensors):
    """Per tensor: (index of its storage among the distinct ones, dtype, shape, stride, offset), and each storage's bytes."""
    storages = {}
    for t in tensors:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    order = list(storages)
    return ([(order.index(t.untyped_storage().data_ptr()), t.dtype, t.shape, t.stride(), t.storage_offset())
             for t in tensors], list(storages.values()))


def test_windows_over_one_storage_come_back_as_windows_over_one_storage(tmp_path):
    ids = torch.randint(0, 90, (203,))
    inputs, targets = ids[:-1].unfold(0, 80, 40), ids[1:].unfold(0, 80, 40)  # overlapping windows, shifted by one
    save_shard(tmp_path / "s.shard", (inputs, targets))
    loaded = load_shard(tmp_path / "s.shard")
    assert all(torch.equal(a, b) for a, b in zip(loaded, (inputs, targets)))
    assert _layout(loaded) == _layout((inputs, targets))
    assert _layout(loaded)[1] == [203 * 8]  # one storage, the loader's bytes, not two copies of the windows


def test_separate_storages_and_dtypes_round_trip(tmp_path):
    images, labels = torch.rand(5, 1, 28, 28), torch.tensor([3, 1, 4, 1, 5])
    save_shard(tmp_path / "s.shard", (images, labels))
    loaded = load_shard(tmp_path / "s.shard")
    assert torch.equal(loaded[0], images) and torch.equal(loaded[1], labels)
    assert _layout(loaded) == _layout((images, labels))


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    save_shard(tmp_path / "s.shard", (torch.arange(100),))
    data = (tmp_path / "s.shard").read_bytes()
    (tmp_path / "cut.shard").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_shard(tmp_path / "cut.shard")
    (tmp_path / "other.shard").write_bytes(b"\x00\x01 not json\n")
    with pytest.raises(ValueError, match="not a caff-shard-1 file"):
        load_shard(tmp_path / "other.shard")
