// torch.library bindings of the patch-embedding extension (imported as fastseg._C).
//
//   fastseg_ext::overlap_patch_embed_fwd(x, weight, bias?, ln_weight, ln_bias, stride, padding, eps,
//                                        keep_y, packed_weight?) -> (out (B, Ho*Wo, C), mean (M,), rstd (M,), y)
//   fastseg_ext::overlap_patch_embed_bwd(grad_out, x, weight, bias?, ln_weight, mean, rstd, y?, stride,
//                                        padding, needs_dx, needs_dweight)
//       -> (dx, dweight, dbias, dln_weight, dln_bias)
//   fastseg_ext::dwconv3x3_gelu_fwd(x, H, W, weight, bias?, in_bias?, approximate) -> y (B, H*W, C)
//   fastseg_ext::mix_ffn_fwd(x, H, W, fc1_weight, fc1_bias?, dw_weight, dw_bias?, fc2_weight, fc2_bias?,
//                            approximate, tile_rows, fp32_gemm, fc1_packed?, fc2_packed?) -> y (B, H*W, Co)
//   fastseg_ext::add_layer_norm_fwd(x, h, h_bias?, weight, bias, eps, out_dtype?) -> (s, y, mean, rstd)
//   fastseg_ext::add_layer_norm_fwd_(x, h!, h_bias?, weight, bias, eps, out_dtype?) -> (y, mean, rstd)
//       (s written into h: a scratch h in inference)
//   fastseg_ext::add_layer_norm_bwd(grad_y, grad_s?, s, weight, mean, rstd)
//       -> (grad_sum, dweight, dbias, dh_bias)    (see add_layer_norm.h; CPU only)
//   fastseg_ext::sr_attention_fwd(q, kv, num_heads, scale) -> out (B, N, C); sr_attention_isa(dtype) -> str
// keep_y (CPU only; the CUDA kernel recomputes the conv in its backward and refuses it) returns
// the conv output + bias as tokens for the backward; otherwise y is an empty tensor.
// packed_weight (CPU only, inference): the conv weight already reordered into oneDNN's blocked
// layout (torch.ops.aten.mkldnn_reorder_conv2d_weight); the Python op caches it per weight
// version, so the conv skips the per-call weight reorder. It must hold the same values as weight.
//
// The CPU kernels are registered here, the CUDA ones in overlap_patch_embed_cuda.cpp (CUDA builds
// only). Fake (meta) implementations and autograd live in fastseg/ops/overlap_patch_embed.py.
// Importing the module runs the registrations; it exposes `with_cuda` (1 when the CUDA kernels
// were compiled in).
#include <Python.h>

#include "dwconv3x3_gelu.h"
#include "mix_ffn.h"
#include "add_layer_norm.h"
#include "overlap_patch_embed.h"
#include "decoder_head.h"
#include "upsample_argmax.h"
#include "sr_attention.h"

#include <torch/library.h>

#ifndef FASTSEG_WITH_CUDA
#define FASTSEG_WITH_CUDA 0
#endif
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

TORCH_LIBRARY(fastseg_ext, m) {
  m.def(
      "overlap_patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor ln_weight, Tensor ln_bias, "
      "int stride, int padding, float eps, bool keep_y, Tensor? packed_weight=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "overlap_patch_embed_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor ln_weight, "
      "Tensor mean, Tensor rstd, Tensor? y, int stride, int padding, bool needs_dx, bool needs_dweight) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fused bilinear upsample (align_corners=False) + argmax over K, inference only (CPU kernel:
  // upsample_argmax_cpu.cpp): (labels (B, H, W) int64, scores (B, H, W) or empty (0, H, W)).
  m.def("upsample_argmax_fwd(Tensor logits, int H, int W, bool return_scores) -> (Tensor, Tensor)");
  // labels (B, H, W) int64 of two chained bilinear resizes (h, w) -> (H1, W1) -> (H, W) + argmax
  m.def("upsample2_argmax_fwd(Tensor logits, int H1, int W1, int H, int W) -> Tensor");
  // The decoder head, inference form, over bands of output rows (CPU kernel: decoder_head_cpu.cpp);
  // the *_packed weights (oneDNN layout, fastseg/ops/packed_linear.py) run its GEMMs on oneDNN:
  // [ReLU](sum of resized maps + x @ x_weight^T + bias) [@ cls_weight^T + cls_bias] -> (B, H, W, K or E).
  m.def(
      "decoder_head_fwd(Tensor[] maps, Tensor? x, Tensor? x_weight, int H, int W, Tensor? bias, bool relu, "
      "Tensor? cls_weight, Tensor? cls_bias, Tensor? x_weight_packed=None, Tensor? cls_weight_packed=None) -> Tensor");
  // Mix-FFN depthwise 3x3 conv + bias + GELU on tokens (B, H*W, C), fc1's bias (in_bias) added to
  // every in-image tap; forward only (CPU kernel: dwconv3x3_gelu_cpu.cpp, float32/bfloat16).
  // Autograd and the fake implementation live in fastseg/ops/dwconv3x3_gelu.py.
  m.def("dwconv3x3_gelu_fwd(Tensor x, int H, int W, Tensor weight, Tensor? bias, Tensor? in_bias, "
        "str approximate) -> Tensor");
  // The whole Mix-FFN, fc1 -> dwconv3x3 + bias + GELU -> fc2, in row tiles; inference forward only
  // (CPU kernel: mix_ffn_cpu.cpp, float32/bfloat16). fc1_packed / fc2_packed: oneDNN-packed weights
  // (torch.ops.mkldnn._reorder_linear_weight). Policy and fake implementation: fastseg/ops/mix_ffn.py.
  m.def("mix_ffn_fwd(Tensor x, int H, int W, Tensor fc1_weight, Tensor? fc1_bias, Tensor dw_weight, "
        "Tensor? dw_bias, Tensor fc2_weight, Tensor? fc2_bias, str approximate, int tile_rows, bool fp32_gemm, "
        "Tensor? fc1_packed=None, Tensor? fc2_packed=None) -> Tensor");
  // Fused residual add + bias + LayerNorm (add_layer_norm_cpu.cpp).
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor h, Tensor? h_bias, Tensor weight, Tensor bias, float eps, "
      "ScalarType? out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_fwd_(Tensor x, Tensor(a!) h, Tensor? h_bias, Tensor weight, Tensor bias, float eps, "
      "ScalarType? out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_bwd(Tensor grad_y, Tensor? grad_s, Tensor s, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Spatial-reduction attention, forward for inference (sr_attention_cpu.cpp, float32/bfloat16):
  // q (B, N, C), kv (B, Nkv, 2C) -> out (B, N, C); sr_attention_isa: the instruction set the kernel
  // uses for that dtype on this CPU ("" = it cannot run). Fake impl in fastseg/ops/sr_attention.py.
  m.def("sr_attention_fwd(Tensor q, Tensor kv, int num_heads, float scale) -> Tensor");
  m.def("sr_attention_isa(ScalarType dtype) -> str");
}

TORCH_LIBRARY_IMPL(fastseg_ext, CPU, m) {
  m.impl("overlap_patch_embed_fwd", &fastseg::overlap_patch_embed_fwd_cpu);
  m.impl("overlap_patch_embed_bwd", &fastseg::overlap_patch_embed_bwd_cpu);
  m.impl("upsample_argmax_fwd", &fastseg::upsample_argmax_fwd_cpu);
  m.impl("upsample2_argmax_fwd", &fastseg::upsample2_argmax_fwd_cpu);
  m.impl("decoder_head_fwd", &fastseg::decoder_head_fwd_cpu);
  m.impl("dwconv3x3_gelu_fwd", &fastseg::dwconv3x3_gelu_fwd_cpu);
  m.impl("mix_ffn_fwd", &fastseg::mix_ffn_fwd_cpu);
  m.impl("add_layer_norm_fwd", &fastseg::add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_fwd_", &fastseg::add_layer_norm_fwd_inplace_cpu);
  m.impl("add_layer_norm_bwd", &fastseg::add_layer_norm_bwd_cpu);
  m.impl("sr_attention_fwd", &fastseg::sr_attention_fwd_cpu);
}

// No tensor argument to dispatch on: a catch-all kernel.
TORCH_LIBRARY_FRAGMENT(fastseg_ext, m) {
  m.impl("sr_attention_isa", [](c10::ScalarType dtype) { return fastseg::sr_attention_cpu_isa(dtype); });
}

// A packed (oneDNN-layout) weight makes the call dispatch on MkldnnCPU: the same CPU kernel.
TORCH_LIBRARY_IMPL(fastseg_ext, MkldnnCPU, m) {
  m.impl("overlap_patch_embed_fwd", &fastseg::overlap_patch_embed_fwd_cpu);
  m.impl("decoder_head_fwd", &fastseg::decoder_head_fwd_cpu);
  m.impl("mix_ffn_fwd", &fastseg::mix_ffn_fwd_cpu);
}

// A plain Python module: importing it loads this library, which runs the registrations above.
#define FASTSEG_STR2(x) #x
#define FASTSEG_STR(x) FASTSEG_STR2(x)
#define FASTSEG_CAT2(a, b) a##b
#define FASTSEG_CAT(a, b) FASTSEG_CAT2(a, b)

static struct PyModuleDef fastseg_module = {
    PyModuleDef_HEAD_INIT, FASTSEG_STR(TORCH_EXTENSION_NAME),
    "fastseg's compiled patch-embedding kernels, registered as torch.ops.fastseg_ext.*", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC FASTSEG_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&fastseg_module);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", FASTSEG_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
