/* What every dualbrain CPU kernel for ONNX Runtime shares (defined in ort_kernels.c, but for what is inline here):
 * the OrtApi table, float32 tensor access, attributes, ONNX Runtime's intra-op threads, and the OrtCustomOp
 * boilerplate.
 * One op per file beside its reference (plugins/<op>/cpu.c); ort_kernels.c registers them all. */
#ifndef DUALBRAIN_ORT_KERNEL_H
#define DUALBRAIN_ORT_KERNEL_H

#include "ort_abi.h"

extern const OrtApi *dualbrain_api;

OrtStatus *dualbrain_error(const char *msg);   /* an invalid-argument status */
/* input `index` as float32 data of rank `rank`, its dims into `dims` */
OrtStatus *dualbrain_input(OrtKernelContext *ctx, size_t index, size_t rank, const float **data, int64_t *dims);
/* input `index` of element type `type`: with `rank_out`, any rank up to `rank` (stored there); else exactly `rank` */
OrtStatus *dualbrain_input_of(OrtKernelContext *ctx, size_t index, int type, size_t rank, size_t *rank_out,
                              const void **data, int64_t *dims);
/* input `index`, a quantized layout's scales of rank `rank`: float32 or float16 (*half 1) */
OrtStatus *dualbrain_scales_input(OrtKernelContext *ctx, size_t index, size_t rank, const void **data, int *half,
                                  int64_t *dims);
OrtStatus *dualbrain_output(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t rank, float **data);
/* a linear's output 0: x's dims `xd` (rank `rank`, changed in place) with the last one `n`; *rows = the
 * product of the others (inline: built on dualbrain_output, so the step harnesses' stub of it serves too) */
static inline OrtStatus *dualbrain_linear_output(OrtKernelContext *ctx, int64_t *xd, size_t rank, int64_t n,
                                                 int64_t *rows, float **y) {
  *rows = 1;
  for (size_t i = 0; i + 1 < rank; i++) *rows *= xd[i];
  xd[rank - 1] = n;
  return dualbrain_output(ctx, 0, xd, rank, y);
}
int64_t dualbrain_attr_int(const OrtKernelInfo *info, const char *name, int64_t fallback);
/* fn(user, i) for i < total over ONNX Runtime's intra-op threads */
OrtStatus *dualbrain_parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total, void *user);
/* shape inference: output `out` is shaped like input `in` */
OrtStatus *dualbrain_same_shape(OrtShapeInferContext *ctx, size_t in, size_t out);

/* callbacks every op shares (float32 tensors, all required, CPU) */
const char *dualbrain_cpu_provider(const OrtCustomOp *op);
int dualbrain_float(const OrtCustomOp *op, size_t index);
int dualbrain_required(const OrtCustomOp *op, size_t index);
int dualbrain_default_memory(const OrtCustomOp *op, size_t index);
int dualbrain_one(const OrtCustomOp *op);
int dualbrain_first_version(const OrtCustomOp *op);
int dualbrain_last_version(const OrtCustomOp *op);
/* create / destroy for an op with no per-node settings (everything it needs is read from its tensors) */
OrtStatus *dualbrain_no_settings(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out);
void dualbrain_no_kernel(void *kernel);

/* const OrtCustomOp `var`: op `name` with n_in inputs typed by `input_type` (e.g. dualbrain_float) and
 * n_out float32 outputs, its kernel made by `create` (CreateKernelV2), run by `compute`
 * (KernelComputeV2), freed by `destroy`, output shapes set by `infer` (NULL: ONNX Runtime's default) */
#define DUALBRAIN_CPU_OP(var, name, n_in, n_out, input_type, create, compute, destroy, infer) \
  static const char *var##_name(const OrtCustomOp *op) { (void)op; return name; }       \
  static size_t var##_inputs(const OrtCustomOp *op) { (void)op; return n_in; }          \
  static size_t var##_outputs(const OrtCustomOp *op) { (void)op; return n_out; }        \
  const OrtCustomOp var = {                                                             \
      .version = DUALBRAIN_ORT_API_VERSION,                                             \
      .GetName = var##_name,                                                            \
      .GetExecutionProviderType = dualbrain_cpu_provider,                               \
      .GetInputType = input_type,                                                       \
      .GetInputTypeCount = var##_inputs,                                                \
      .GetOutputType = dualbrain_float,                                                 \
      .GetOutputTypeCount = var##_outputs,                                              \
      .KernelDestroy = destroy,                                                         \
      .GetInputCharacteristic = dualbrain_required,                                     \
      .GetOutputCharacteristic = dualbrain_required,                                    \
      .GetInputMemoryType = dualbrain_default_memory,                                   \
      .GetVariadicInputMinArity = dualbrain_one,                                        \
      .GetVariadicInputHomogeneity = dualbrain_one,                                     \
      .GetVariadicOutputMinArity = dualbrain_one,                                       \
      .GetVariadicOutputHomogeneity = dualbrain_one,                                    \
      .CreateKernelV2 = create,                                                         \
      .KernelComputeV2 = compute,                                                       \
      .InferOutputShapeFn = infer,                                                      \
      .GetStartVersion = dualbrain_first_version,                                       \
      .GetEndVersion = dualbrain_last_version,                                          \
  }

#endif
