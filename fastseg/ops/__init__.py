"""Fused ops: each has a reference beside it; :mod:`fastseg.ops.dispatch` picks the backend."""
from fastseg.ops.conv import conv2d
from fastseg.ops.decoder_upsample_fuse import fold_mlp_head, fold_mmseg_head, upsample_sum, upsample_sum_reference
from fastseg.ops.dispatch import BackendUnavailable, choose, use_backend
from fastseg.ops.dwconv3x3_gelu import dwconv3x3_gelu, dwconv3x3_gelu_reference
from fastseg.ops.mix_ffn import mix_ffn, mix_ffn_reference
from fastseg.ops.overlap_patch_embed import overlap_patch_embed, overlap_patch_embed_reference
from fastseg.ops.sr_attention import sr_attention, sr_attention_reference
from fastseg.ops.upsample_argmax import upsample_argmax, upsample_argmax_reference
from fastseg.ops.add_layer_norm import add_layer_norm, add_layer_norm_reference

__all__ = [
    "add_layer_norm",
    "add_layer_norm_reference",
    "BackendUnavailable",
    "choose",
    "conv2d",
    "fold_mlp_head",
    "fold_mmseg_head",
    "upsample_sum",
    "upsample_sum_reference",
    "use_backend",
    "dwconv3x3_gelu",
    "dwconv3x3_gelu_reference",
    "mix_ffn",
    "mix_ffn_reference",
    "overlap_patch_embed",
    "overlap_patch_embed_reference",
    "sr_attention",
    "sr_attention_reference",
    "upsample_argmax",
    "upsample_argmax_reference",
]
