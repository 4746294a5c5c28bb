// Operator schemas of the cgc extension (namespace torch.ops.cgc). Kernels are registered per
// dispatch key in cpu/*.cpp and cuda/*.cu, autograd in autograd.cpp; fake (meta) implementations
// are registered from Python in cgc/ops/native.py. Every op computes what cgc/ops/reference.py does.
#include <Python.h>
#include <torch/library.h>

// `import cgc._C` loads this shared library, which runs the registrations below; the module
// itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cgc native kernels (torch.ops.cgc)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(cgc, m) {
  // relu(sum_k w_k * A_k) -> [B,H,W]; w = spatial mean of gradients (pool, 4-D), gradients
  // (element-wise, not pool) or the given [B,K] weights.
  m.def("gradcam_fwd(Tensor activations, Tensor gradients, bool pool) -> Tensor");
  // (d activations, d gradients) of gradcam_fwd; `out` is its result, whose sign is the ReLU mask.
  m.def("gradcam_bwd(Tensor grad_out, Tensor out, Tensor activations, Tensor gradients, bool pool)"
        " -> (Tensor, Tensor)");
  // grid_sample(input, affine_grid(theta, (B,C,out_h,out_w)), bilinear, align_corners=False);
  // padding_mode 0 = zeros, 1 = border. theta [B,2,3] of any floating dtype.
  m.def("affine_warp_fwd(Tensor input, Tensor theta, SymInt out_h, SymInt out_w, int padding_mode) -> Tensor");
  // d input [B,C,in_h,in_w] of affine_warp_fwd (linear in grad_out).
  m.def("affine_warp_bwd(Tensor grad_out, Tensor theta, SymInt in_h, SymInt in_w, int padding_mode) -> Tensor");
  // InfoNCE over L2-normalized rows; reduction 0 = none, 1 = mean, 2 = sum. Returns
  // (loss, logits [B,B] with the positive logit on the diagonal, stats [3,B] = 1/|a|, 1/|p|,
  // row logsumexp); logits and stats are saved for the backward, in float64.
  m.def("info_nce_fwd(Tensor anchors, Tensor positives, float temperature, int reduction)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("info_nce_bwd(Tensor grad_loss, Tensor anchors, Tensor positives, Tensor logits, Tensor stats,"
        " float temperature, int reduction) -> (Tensor, Tensor)");
  // InfoNCE against explicit negatives [N,D]: anchor b's negatives are the rows k != anchor_index[b]
  // (int64 [b], -1 = exclude none). Returns (loss, logits [b,1+N] with the positive in column 0 and
  // -inf in the excluded columns, stats [3,b] as info_nce_fwd, the negatives' norms [N]), float64
  // but the loss; the backward gives (d anchors, d positives, d negatives).
  m.def("info_nce_neg_fwd(Tensor anchors, Tensor positives, Tensor negatives, Tensor anchor_index,"
        " float temperature, int reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("info_nce_neg_bwd(Tensor grad_loss, Tensor anchors, Tensor positives, Tensor negatives, Tensor logits,"
        " Tensor stats, Tensor neg_norms, float temperature, int reduction) -> (Tensor, Tensor, Tensor)");
}
