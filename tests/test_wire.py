"""Bytes on the wire: caff's count against Flower's own serialization of what crosses (a state dict
packed into one array), and the cost model's bound."""

import pytest
import torch

from costmodel import ZOO, TrainMode, apply_mode, build_model, estimate
from costmodel.wire import array_wire_bound, record_bytes, wire_bytes

pytest.importorskip("flwr")


def _flower_bytes(tensors):
    """Flower's serialized size of the record caff sends for ``tensors``."""
    from trainer.flower import packed_record, serialized_bytes

    return serialized_bytes(packed_record(tensors))


def _flower_unpacked_bytes(tensors):
    """Flower's serialized size of a record holding each tensor as an array of its own."""
    from flwr.app import ArrayRecord

    from trainer.flower import serialized_bytes

    return serialized_bytes(ArrayRecord({k: v.contiguous() for k, v in tensors.items()}))


def _lora_model_tensors(spec):
    model = apply_mode(build_model(spec), TrainMode.parse("lora:8", spec.n_blocks))
    return {n.replace(".base_layer.", "."): p.detach() for n, p in model.named_parameters()}


RECORDS = {
    "empty": {},
    "equal arrays cross once": {"a": torch.zeros(3), "b": torch.zeros(3), "c": torch.ones(2, 3)},
    "several 5 MiB chunks, two equal": {"big": torch.randn(1_500_000), "zeros": torch.zeros(3_000_000)},
    "a long name, 4 dimensions": {"x" * 150: torch.randn(4, 3, 2, 2)},
    "ints and doubles": {"i": torch.arange(7), "d": torch.randn(5, dtype=torch.float64)},
    "char-gpt-xs with LoRA factors (zero B: equal chunks)": _lora_model_tensors(ZOO["char-gpt-xs"]),
}


@pytest.mark.parametrize("name", RECORDS)
def test_wire_bytes_equal_flowers_serialized_record(name):
    assert wire_bytes(RECORDS[name]) == _flower_bytes(RECORDS[name])
    assert record_bytes({k: v.numpy() for k, v in RECORDS[name].items()}) == _flower_unpacked_bytes(RECORDS[name])


def test_a_packed_record_is_one_array_and_unpacks_bit_for_bit():
    from trainer.flower import packed_record, unpacked_state

    tensors = RECORDS["ints and doubles"] | {"h": torch.randn(3, 2).to(torch.float16).view(torch.int16)}
    record = packed_record(tensors)
    assert list(record.keys()) == ["state"] and record["state"].dtype == "uint8"
    back = unpacked_state(record)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("spec", [s for s in ZOO.values() if s.name != "char-gpt-l"], ids=lambda s: s.name)
def test_the_estimates_bound_holds_for_every_array_of_every_model(spec):
    """Every parameter and LoRA factor, alone in a record (the worst case: no record to share),
    with random values (nothing deduplicated): packed as caff sends it, and as an array of its own."""
    for name, tensor in _lora_model_tensors(spec).items():
        tensor = torch.randn_like(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        assert nbytes < _flower_bytes({name: tensor}) <= array_wire_bound(nbytes), name
        assert nbytes < _flower_unpacked_bytes({name: tensor}) <= array_wire_bound(nbytes), name


def test_the_estimated_upload_bounds_the_serialized_reply_of_every_mode():
    spec = ZOO["char-gpt-xs"]
    for text in ("head", "lora:2", "last:2", "blocks:3+lora:0=2,1=4", "all"):
        mode = TrainMode.parse(text, spec.n_blocks)
        model = apply_mode(build_model(spec), mode)
        trained = {n.replace(".base_layer.", "."): torch.randn_like(p) for n, p in model.named_parameters()
                   if p.requires_grad}
        raw = sum(t.numel() * t.element_size() for t in trained.values())
        planned = estimate(spec, mode, 2, 80).totals["upload_bytes"]
        assert raw < _flower_bytes(trained) <= planned < raw + 700 * len(trained), text
