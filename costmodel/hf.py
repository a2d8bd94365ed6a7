"""Hugging Face ``transformers`` models: read a spec from ``config.json``, and measure the real modules.

Supported families: BERT (and MiniLM, which is a BERT) as ``BertForSequenceClassification``,
GPT-2 as ``GPT2LMHeadModel``, ViT as ``ViTForImageClassification``. Their ops are the
ones our builder makes for the same spec (GPT-2: fused ``c_attn``, ``gelu_new``, tied LM head,
positions looked up by id, labels shifted inside its loss, and with ``use_cache``, its default, a
``DynamicCache`` even in training, whose ``torch.cat`` onto an empty cache copies every block's keys
and values: ``kv_cache``), so one estimate serves both. Dropout on attention probabilities is switched off: CPU SDPA
cannot apply it without falling back to the math kernel, and the estimate does not model it.
"""

from __future__ import annotations

import torch
from torch import nn

from costmodel.build import inject_lora
from costmodel.estimate import normalize_mode
from costmodel.mode import TrainMode
from costmodel.spec import ModelSpec

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu"}


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _labels(config: dict) -> int:
    return config.get("num_labels") or len(config.get("id2label") or {}) or 2


def _bert_like(config: dict) -> dict:
    """Fields BERT and ViT configs name alike."""
    return dict(n_blocks=config["num_hidden_layers"], d_model=config["hidden_size"],
                n_heads=config["num_attention_heads"], d_ff=config["intermediate_size"], n_classes=_labels(config),
                activation=_activation(config.get("hidden_act", "gelu")), attention="sdpa",
                dropout=config.get("hidden_dropout_prob", 0.0), layer_norm_eps=config.get("layer_norm_eps", 1e-12))


def spec_from_hf_config(config: dict, name: str = "hf") -> ModelSpec:
    """A `ModelSpec` from a ``config.json`` of the BERT, GPT-2 or ViT family."""
    family = config.get("model_type")
    try:
        if family == "bert":
            return ModelSpec(name=name, kind="encoder", norm="post", max_seq_len=config["max_position_embeddings"],
                             vocab_size=config["vocab_size"], type_vocab_size=config.get("type_vocab_size", 2),
                             pad_token_id=config.get("pad_token_id"), **_bert_like(config))
        if family == "vit":
            return ModelSpec(name=name, kind="vit", norm="pre", image_size=config["image_size"],
                             patch_size=config["patch_size"], channels=config.get("num_channels", 3),
                             **_bert_like(config))
        if family == "gpt2":
            width = config["n_embd"]
            return ModelSpec(
                name=name, kind="gpt", n_blocks=config["n_layer"], d_model=width, n_heads=config["n_head"],
                d_ff=config.get("n_inner") or 4 * width, max_seq_len=config["n_positions"],
                vocab_size=config["vocab_size"], norm="pre",
                activation=_activation(config.get("activation_function", "gelu_new")), attention="sdpa",
                dropout=config.get("resid_pdrop", 0.1), tied_embeddings=config.get("tie_word_embeddings", True),
                fused_qkv=True, layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
                kv_cache=config.get("use_cache", True), position_lookup=True, shift_labels=True)
    except KeyError as missing:
        raise ValueError(f"config.json of a {family} model lacks {missing}") from None
    raise ValueError(f"unsupported model_type {family!r} (bert, gpt2, vit)")


def hf_config(spec: ModelSpec):
    """The ``transformers`` config of the same shape as ``spec`` (no dropout in attention probabilities)."""
    import transformers

    common = dict(attn_implementation="sdpa" if spec.attention == "sdpa" else "eager")
    if spec.kind == "encoder":
        return transformers.BertConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.d_model, num_hidden_layers=spec.n_blocks,
            num_attention_heads=spec.n_heads, intermediate_size=spec.d_ff, hidden_act=spec.activation,
            max_position_embeddings=spec.max_seq_len, type_vocab_size=spec.type_vocab_size,
            num_labels=spec.n_classes, hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=0.0,
            layer_norm_eps=spec.layer_norm_eps, **common)
    if spec.kind == "gpt":
        if not (spec.position_lookup and spec.shift_labels):
            raise ValueError("transformers' GPT-2 looks its positions up by id and shifts its labels itself: "
                             "its spec needs position_lookup and shift_labels")
        return transformers.GPT2Config(
            vocab_size=spec.vocab_size, n_positions=spec.max_seq_len, n_embd=spec.d_model, n_layer=spec.n_blocks,
            n_head=spec.n_heads, n_inner=spec.d_ff, activation_function=spec.activation,
            resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=0.0,
            layer_norm_epsilon=spec.layer_norm_eps, tie_word_embeddings=spec.tied_embeddings,
            bos_token_id=0, eos_token_id=0, use_cache=spec.kv_cache, **common)
    return transformers.ViTConfig(
        hidden_size=spec.d_model, num_hidden_layers=spec.n_blocks, num_attention_heads=spec.n_heads,
        intermediate_size=spec.d_ff, hidden_act=spec.activation, image_size=spec.image_size,
        patch_size=spec.patch_size, num_channels=spec.channels, num_labels=spec.n_classes,
        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=0.0, layer_norm_eps=spec.layer_norm_eps,
        **common)


def build_hf_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    family = {"encoder": transformers.BertForSequenceClassification, "gpt": transformers.GPT2LMHeadModel,
              "vit": transformers.ViTForImageClassification}[spec.kind]
    return family(hf_config(spec))


def hf_layers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Layer name -> modules, as `costmodel.estimate.layer_names` names them (the loss runs in the root)."""
    if hasattr(model, "bert"):
        base, blocks, head = model.bert, model.bert.encoder.layer, [model.bert.pooler, model.classifier]
        embed = [base.embeddings]
    elif hasattr(model, "transformer"):
        base = model.transformer
        blocks, head, embed = base.h, [base.ln_f, model.lm_head], [base.wte, base.wpe, base.drop]
    else:
        base = model.vit
        blocks, head, embed = base.layers, [base.layernorm, model.classifier], [base.embeddings]
    return {"embed": embed, **{f"block.{i}": [block] for i, block in enumerate(blocks)}, "head": head}


def _block_prefix(model: nn.Module) -> str:
    return {"bert": "bert.encoder.layer", "transformer": "transformer.h", "vit": "vit.layers"}[
        next(attr for attr in ("bert", "transformer", "vit") if hasattr(model, attr))]


_LORA_TARGETS = {
    "bert.encoder.layer": ("attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense", "intermediate.dense", "output.dense"),
    "vit.layers": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
    "transformer.h": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}


def apply_mode_hf(model: nn.Module, spec: ModelSpec, mode: TrainMode) -> nn.Module:
    """Freeze what ``mode`` does not train and inject its LoRA adapters into a transformers model."""
    if mode.recompute or mode.frozen:
        raise ValueError("recompute and frozen:bf16|int8 run on caff's own models only; a transformers model "
                         "cannot measure them")
    mode = normalize_mode(spec, mode)
    prefix = _block_prefix(model)
    inject_lora(model, {f"{prefix}.{b}.{t}": r for b, r in mode.lora.items() for t in _LORA_TARGETS[prefix]})
    layers = hf_layers(model)
    model.requires_grad_(False)
    for block in mode.blocks:
        layers[f"block.{block}"][0].requires_grad_(True)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    for module in layers["head"] + (layers["embed"] if mode.embeddings else []):
        module.requires_grad_(True)
    return model


def hf_step_loss(model: nn.Module, spec: ModelSpec, inputs, targets):
    """The loss of one batch through the model's own loss (GPT-2 predicts its inputs shifted by one)."""
    if spec.kind == "vit":
        return lambda: model(pixel_values=inputs, labels=targets).loss
    if spec.kind == "gpt":
        return lambda: model(input_ids=inputs, labels=inputs).loss
    return lambda: model(input_ids=inputs, labels=targets).loss


def load_hf_model(spec: ModelSpec, model_dir: str, weights: bool = True) -> nn.Module:
    """The pretrained model in ``model_dir`` (offline), with the head our spec names; without ``weights``
    built from its ``config.json`` alone, randomly initialized (costs do not depend on the weights)."""
    import transformers

    family = {"encoder": transformers.BertForSequenceClassification, "gpt": transformers.GPT2LMHeadModel,
              "vit": transformers.ViTForImageClassification}[spec.kind]
    if spec.kind == "gpt":
        extra = dict(resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=0.0, use_cache=spec.kv_cache)
    else:
        extra = dict(num_labels=spec.n_classes, hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=0.0)
    if not weights:
        return family(family.config_class.from_pretrained(model_dir, attn_implementation="sdpa", **extra))
    return family.from_pretrained(model_dir, local_files_only=True, attn_implementation="sdpa", **extra)


def measure_hf(spec: ModelSpec, mode: TrainMode, batch: int = 16, seq: int | None = None, optimizer: str = "sgd",
               model_dir: str | None = None, seed: int = 0):
    """Measure one step of the transformers model of ``spec``, or of the one ``model_dir``'s config.json
    describes (built from the config alone: weights do not change costs, and the folder need not hold any)."""
    from costmodel.build import make_batch, make_optimizer
    from costmodel.measure import check_fits, measure_step

    check_fits(spec, mode, batch, seq, optimizer)
    torch.manual_seed(seed)
    model = load_hf_model(spec, model_dir, weights=False) if model_dir else build_hf_model(spec, seed)
    model = apply_mode_hf(model, spec, mode)
    inputs, targets = make_batch(spec, batch, seq, seed)
    opt = make_optimizer(model.parameters(), optimizer)
    return measure_step(model, hf_layers(model), hf_step_loss(model, spec, inputs, targets), opt, (inputs, targets))


def tiny_state_from_bert(bert_state: dict, spec: ModelSpec) -> dict:
    """A `BertForSequenceClassification` state dict renamed for our ``encoder`` `TinyTransformer`."""
    names = {"bert.embeddings.word_embeddings.weight": "embed.tok.weight",
             "bert.embeddings.position_embeddings.weight": "embed.pos",
             "bert.embeddings.token_type_embeddings.weight": "embed.token_type",
             "bert.embeddings.LayerNorm.weight": "embed.norm.weight", "bert.embeddings.LayerNorm.bias": "embed.norm.bias",
             "bert.pooler.dense.weight": "head.pooler.weight", "bert.pooler.dense.bias": "head.pooler.bias",
             "classifier.weight": "head.out.weight", "classifier.bias": "head.out.bias"}
    per_block = {"attention.self.query": "attn.q", "attention.self.key": "attn.k", "attention.self.value": "attn.v",
                 "attention.output.dense": "attn.o", "attention.output.LayerNorm": "ln1",
                 "intermediate.dense": "mlp.fc", "output.dense": "mlp.proj", "output.LayerNorm": "ln2"}
    for block in range(spec.n_blocks):
        for theirs, ours in per_block.items():
            for kind in ("weight", "bias"):
                names[f"bert.encoder.layer.{block}.{theirs}.{kind}"] = f"blocks.{block}.{ours}.{kind}"
    missing = sorted(set(names) - set(bert_state))
    if missing:
        raise ValueError(f"not a BERT classifier of this shape: no {missing[0]}")
    return {ours: bert_state[theirs] for theirs, ours in names.items()}
