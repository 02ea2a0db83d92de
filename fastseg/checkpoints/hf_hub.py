"""HuggingFace ``transformers`` Segformer as stored on the Hub and written by its ``save_pretrained``.

A directory with ``config.json`` (``model_type: "segformer"``, ``hidden_sizes``, ``depths``,
``num_attention_heads``, ``sr_ratios``, ``decoder_hidden_size``, ``id2label``) and ``model.safetensors``
(or ``pytorch_model.bin``, or shards with an index), or a weights file alone. Keys:
``segformer.encoder.patch_embeddings.{i}.{proj,layer_norm}``, ``segformer.encoder.block.{i}.{j}.{layer_norm_1,
attention.self.{query,key,value,sr,layer_norm}, attention.output.dense, layer_norm_2, mlp.{dense1, dwconv.dwconv,
dense2}}``, ``segformer.encoder.layer_norm.{i}``, ``decode_head.{linear_c.{i}.proj, linear_fuse, batch_norm,
classifier}``. LayerNorm eps 1e-5 everywhere. Logits at 1/4.
"""
from __future__ import annotations

from pathlib import Path

from . import _mit
from ._common import (WEIGHTS_FILE, Converted, Rules, has_key, model_directory, refuse_existing, save_json_atomic,
                      save_safetensors_atomic)

NAME = "hf_legacy"
FAMILY = "segformer"
TITLE = "HuggingFace (hub file names)"
EPS = _mit.EPS_HF
OUTPUT = "logits at 1/4 of the input, as transformers' SegformerForSemanticSegmentation"

_E = r"(?:segformer\.)?encoder\."
_S = r"encoder.stages.\1"
_TO = Rules([
    (_E + r"patch_embeddings\.(\d)\.proj\.(.+)", _S + r".patch_embed.proj.\2"),
    (_E + r"patch_embeddings\.(\d)\.layer_norm\.(.+)", _S + r".patch_embed.norm.\2"),
    (_E + r"block\.(\d)\.(\d+)\.layer_norm_1\.(.+)", _S + r".blocks.\2.norm1.\3"),
    (_E + r"block\.(\d)\.(\d+)\.layer_norm_2\.(.+)", _S + r".blocks.\2.norm2.\3"),
    (_E + r"block\.(\d)\.(\d+)\.attention\.self\.query\.(.+)", _S + r".blocks.\2.attn.q.\3"),
    (_E + r"block\.(\d)\.(\d+)\.attention\.self\.key\.(.+)", _S + r".blocks.\2.attn.k.\3"),
    (_E + r"block\.(\d)\.(\d+)\.attention\.self\.value\.(.+)", _S + r".blocks.\2.attn.v.\3"),
    (_E + r"block\.(\d)\.(\d+)\.attention\.self\.sr\.(.+)", _S + r".blocks.\2.attn.sr.\3"),
    (_E + r"block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.(.+)", _S + r".blocks.\2.attn.norm.\3"),
    (_E + r"block\.(\d)\.(\d+)\.attention\.output\.dense\.(.+)", _S + r".blocks.\2.attn.proj.\3"),
    (_E + r"block\.(\d)\.(\d+)\.mlp\.dense1\.(.+)", _S + r".blocks.\2.mlp.fc1.\3"),
    (_E + r"block\.(\d)\.(\d+)\.mlp\.dense2\.(.+)", _S + r".blocks.\2.mlp.fc2.\3"),
    (_E + r"block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", _S + r".blocks.\2.mlp.dwconv.\3"),
    (_E + r"layer_norm\.(\d)\.(.+)", _S + r".norm.\2"),
    (r"decode_head\.linear_c\.(\d)\.proj\.(.+)", r"decoder.linear_c.\1.\2"),
    (r"decode_head\.linear_fuse\.weight", "decoder.linear_fuse.weight"),
    (r"decode_head\.batch_norm\.(.+)", r"decoder.bn.\1"),
    (r"decode_head\.classifier\.(.+)", r"decoder.classifier.\1"),
], drop=[r"classifier\.(weight|bias)"])  # SegformerForImageClassification's ImageNet head

_B = r"encoder\.stages\.(\d)\.blocks\.(\d+)\."
_H = r"segformer.encoder.block.\1.\2."
_FROM = Rules([
    (r"encoder\.stages\.(\d)\.patch_embed\.proj\.(.+)", r"segformer.encoder.patch_embeddings.\1.proj.\2"),
    (r"encoder\.stages\.(\d)\.patch_embed\.norm\.(.+)", r"segformer.encoder.patch_embeddings.\1.layer_norm.\2"),
    (_B + r"norm1\.(.+)", _H + r"layer_norm_1.\3"),
    (_B + r"norm2\.(.+)", _H + r"layer_norm_2.\3"),
    (_B + r"attn\.q\.(.+)", _H + r"attention.self.query.\3"),
    (_B + r"attn\.k\.(.+)", _H + r"attention.self.key.\3"),
    (_B + r"attn\.v\.(.+)", _H + r"attention.self.value.\3"),
    (_B + r"attn\.sr\.(.+)", _H + r"attention.self.sr.\3"),
    (_B + r"attn\.norm\.(.+)", _H + r"attention.self.layer_norm.\3"),
    (_B + r"attn\.proj\.(.+)", _H + r"attention.output.dense.\3"),
    (_B + r"mlp\.fc1\.(.+)", _H + r"mlp.dense1.\3"),
    (_B + r"mlp\.fc2\.(.+)", _H + r"mlp.dense2.\3"),
    (_B + r"mlp\.dwconv\.(.+)", _H + r"mlp.dwconv.dwconv.\3"),
    (r"encoder\.stages\.(\d)\.norm\.(.+)", r"segformer.encoder.layer_norm.\1.\2"),
    (r"decoder\.linear_c\.(\d)\.(.+)", r"decode_head.linear_c.\1.proj.\2"),
    (r"decoder\.linear_fuse\.weight", "decode_head.linear_fuse.weight"),
    (r"decoder\.bn\.(.+)", r"decode_head.batch_norm.\1"),
    (r"decoder\.classifier\.(.+)", r"decode_head.classifier.\1"),
])


def detect(keys, src) -> bool:
    return has_key(keys, _E + r"(patch_embeddings|block)\..+")


def config_hints(hf_config: dict | None) -> dict:
    """What HF's config.json says that the tensors do not: head counts, decoder width."""
    hints = {"eps": EPS}
    if hf_config:
        if "num_attention_heads" in hf_config:
            hints["num_heads"] = tuple(int(h) for h in hf_config["num_attention_heads"])
        if "decoder_hidden_size" in hf_config:
            hints["decoder_dim"] = int(hf_config["decoder_hidden_size"])
    return hints


def to_fastseg(state: dict, src) -> Converted:
    origin = {}
    sd, unexpected, ignored = _TO.apply(state, origin)
    _mit.merge_kv(sd, origin)
    return Converted(sd, unexpected, ignored, origin=origin, hints=config_hints(src.hf_config))


def check(config) -> None:
    _mit.require_head(config, "mlp", "the HuggingFace layout",
                      "transformers' SegformerDecodeHead is the All-MLP head (Linear projections, one BN after "
                      "the fuse); mmseg's SegformerHead puts conv + BN + ReLU on every branch, which it cannot hold")


def from_fastseg(state: dict, config) -> tuple[dict, list[str]]:
    check(config)
    sd = dict(state)
    _mit.split_kv(sd)
    out, unexpected, _ = _FROM.apply(sd)
    assert not unexpected, unexpected
    return out, []


def hf_config(config) -> dict:
    """A ``config.json`` that ``transformers.SegformerConfig`` reads for this architecture."""
    labels = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
    return {
        "architectures": ["SegformerForSemanticSegmentation"],
        "model_type": "segformer",
        "num_channels": int(config.in_channels),
        "num_encoder_blocks": 4,
        "depths": list(config.depths),
        "sr_ratios": list(config.sr_ratios),
        "hidden_sizes": list(config.embed_dims),
        "patch_sizes": [7, 3, 3, 3],
        "strides": [4, 2, 2, 2],
        "num_attention_heads": list(config.num_heads),
        "mlp_ratios": [int(config.mlp_ratio)] * 4,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout_prob": float(config.decoder_dropout),
        "drop_path_rate": float(config.drop_path_rate),
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "decoder_hidden_size": int(config.decoder_dim),
        "semantic_loss_ignore_index": 255,
        "reshape_last_stage": True,
        "id2label": labels,
        "label2id": {v: int(k) for k, v in labels.items()},
    }


def write(path: Path, tensors: dict, config, overwrite: bool) -> Path:
    """A HuggingFace model directory: config.json + model.safetensors (``{"format": "pt"}``, as transformers)."""
    path = Path(path)
    if path.suffix:
        raise ValueError(f"{path}: a HuggingFace model is a directory (config.json + model.safetensors); "
                         "give a path without a suffix")
    refuse_existing(path, overwrite)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    with model_directory(path) as tmp:  # config.json and weights replace the old ones together
        save_safetensors_atomic(tensors, tmp / WEIGHTS_FILE, {"format": "pt"})
        save_json_atomic(hf_config(config), tmp / "config.json")
    return path
