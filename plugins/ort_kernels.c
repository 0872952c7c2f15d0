/* dualbrain's CPU kernels for ONNX Runtime: the shared glue (ort_kernel.h) and the library's entry point.
 * Built by dualbrain.runtime.backends.ort_kernels, which passes the domain (DUALBRAIN_CPU_DOMAIN). */
#include <stdlib.h>

#include "ort_kernel.h"

#ifndef DUALBRAIN_CPU_DOMAIN
#error "build through dualbrain.runtime.backends.ort_kernels, which defines DUALBRAIN_CPU_DOMAIN"
#endif

extern const OrtCustomOp dualbrain_moe_dispatch_op, dualbrain_int4_moe_dispatch_op, dualbrain_int8_moe_dispatch_op,
    dualbrain_int4_shared_moe_dispatch_op,
    dualbrain_causal_conv_op, dualbrain_int8_matmul_op, dualbrain_int4_matmul_op, dualbrain_gated_delta_op,
    dualbrain_gated_delta_window_op, dualbrain_gated_delta_mixer_op,
    dualbrain_gated_delta_mixer_raw_op, dualbrain_cached_attention_op;
static const OrtCustomOp *const OPS[] = {&dualbrain_moe_dispatch_op, &dualbrain_int4_moe_dispatch_op,
                                         &dualbrain_int8_moe_dispatch_op, &dualbrain_int4_shared_moe_dispatch_op,
                                         &dualbrain_causal_conv_op,
                                         &dualbrain_int8_matmul_op,  &dualbrain_int4_matmul_op,
                                         &dualbrain_gated_delta_op,  &dualbrain_gated_delta_window_op,
                                         &dualbrain_gated_delta_mixer_op, &dualbrain_gated_delta_mixer_raw_op,
                                         &dualbrain_cached_attention_op};

const OrtApi *dualbrain_api;

OrtStatus *dualbrain_error(const char *msg) {
  return ORT_FN(dualbrain_api, CreateStatus, OrtCreateStatusFn)(ORT_INVALID_ARGUMENT, msg);
}

OrtStatus *dualbrain_input(OrtKernelContext *ctx, size_t index, size_t rank, const float **data, int64_t *dims) {
  return dualbrain_input_of(ctx, index, ORT_TENSOR_FLOAT, rank, NULL, (const void **)data, dims);
}

/* input `index`: its element type into *type, its rank (at most `rank`) into *got_rank, its dims and data */
static OrtStatus *input_typed(OrtKernelContext *ctx, size_t index, size_t rank, int *type, size_t *got_rank,
                              const void **data, int64_t *dims) {
  const OrtApi *api = dualbrain_api;
  const OrtValue *v;
  OrtTensorTypeAndShapeInfo *info;
  OrtStatus *st;
  if ((st = ORT_FN(api, KernelContext_GetInput, OrtKernelContextGetInputFn)(ctx, index, &v))) return st;
  if ((st = ORT_FN(api, GetTensorTypeAndShape, OrtGetTensorTypeAndShapeFn)(v, &info))) return st;
  st = ORT_FN(api, GetTensorElementType, OrtGetTensorElementTypeFn)(info, type);
  if (!st) st = ORT_FN(api, GetDimensionsCount, OrtGetDimensionsCountFn)(info, got_rank);
  if (!st && *got_rank > rank) st = dualbrain_error("dualbrain CPU kernel: an input has more dimensions than it takes");
  if (!st) st = ORT_FN(api, GetDimensions, OrtGetDimensionsFn)(info, dims, *got_rank);
  ORT_FN(api, ReleaseTensorTypeAndShapeInfo, OrtReleaseTensorTypeAndShapeInfoFn)(info);
  if (!st) st = ORT_FN(api, GetTensorMutableData, OrtGetTensorMutableDataFn)((OrtValue *)v, (void **)data);
  return st;
}

OrtStatus *dualbrain_input_of(OrtKernelContext *ctx, size_t index, int want, size_t rank, size_t *rank_out,
                              const void **data, int64_t *dims) {
  size_t got_rank;
  int type;
  OrtStatus *st = input_typed(ctx, index, rank, &type, &got_rank, data, dims);
  if (!st && (type != want || (!rank_out && got_rank != rank)))
    st = dualbrain_error("dualbrain CPU kernel: an input is not of the expected element type and rank");
  if (!st && rank_out) *rank_out = got_rank;
  return st;
}

OrtStatus *dualbrain_scales_input(OrtKernelContext *ctx, size_t index, size_t rank, const void **data, int *half,
                                  int64_t *dims) {
  size_t got_rank;
  int type = ORT_TENSOR_UNDEFINED;
  OrtStatus *st = input_typed(ctx, index, rank, &type, &got_rank, data, dims);
  if (!st && ((type != ORT_TENSOR_FLOAT && type != ORT_TENSOR_FLOAT16) || got_rank != rank))
    st = dualbrain_error("dualbrain CPU kernel: scales must be float32 or float16, of the layout's rank");
  *half = type == ORT_TENSOR_FLOAT16;
  return st;
}

OrtStatus *dualbrain_output(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t rank, float **data) {
  OrtValue *out;
  OrtStatus *st = ORT_FN(dualbrain_api, KernelContext_GetOutput, OrtKernelContextGetOutputFn)(ctx, index, dims, rank, &out);
  return st ? st : ORT_FN(dualbrain_api, GetTensorMutableData, OrtGetTensorMutableDataFn)(out, (void **)data);
}

int64_t dualbrain_attr_int(const OrtKernelInfo *info, const char *name, int64_t fallback) {
  int64_t v;
  OrtStatus *st = ORT_FN(dualbrain_api, KernelInfoGetAttribute_int64, OrtKernelInfoGetAttributeInt64Fn)(info, name, &v);
  if (st) {  /* absent: the op's default */
    ORT_FN(dualbrain_api, ReleaseStatus, OrtReleaseStatusFn)(st);
    return fallback;
  }
  return v;
}

OrtStatus *dualbrain_parallel(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total, void *user) {
  return ORT_FN(dualbrain_api, KernelContext_ParallelFor, OrtParallelForFn)(ctx, fn, total, 0, user);
}

OrtStatus *dualbrain_same_shape(OrtShapeInferContext *ctx, size_t in, size_t out) {
  OrtTensorTypeAndShapeInfo *info;
  OrtStatus *st = ORT_FN(dualbrain_api, ShapeInferContext_GetInputTypeShape, OrtShapeInferGetInputFn)(ctx, in, &info);
  return st ? st : ORT_FN(dualbrain_api, ShapeInferContext_SetOutputTypeShape, OrtShapeInferSetOutputFn)(ctx, out, info);
}

const char *dualbrain_cpu_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
int dualbrain_float(const OrtCustomOp *op, size_t index) { (void)op, (void)index; return ORT_TENSOR_FLOAT; }
int dualbrain_required(const OrtCustomOp *op, size_t index) { (void)op, (void)index; return ORT_IO_REQUIRED; }
int dualbrain_default_memory(const OrtCustomOp *op, size_t index) { (void)op, (void)index; return ORT_MEM_DEFAULT; }
int dualbrain_one(const OrtCustomOp *op) { (void)op; return 1; }
int dualbrain_first_version(const OrtCustomOp *op) { (void)op; return 1; }
int dualbrain_last_version(const OrtCustomOp *op) { (void)op; return 0x7fffffff; }

OrtStatus *dualbrain_no_settings(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
  (void)op, (void)api, (void)info;
  *out = NULL;
  return NULL;
}

void dualbrain_no_kernel(void *kernel) { (void)kernel; }

/* ONNX Runtime's entry point for SessionOptions.register_custom_ops_library */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  OrtCustomOpDomain *domain;
  OrtStatus *st;
  const OrtApi *api = base->GetApi(DUALBRAIN_ORT_API_VERSION);
  if (!api) return NULL;  /* ONNX Runtime < 1.17 has no status to say so with: the nodes then fail to load */
  dualbrain_api = api;
  if ((st = ORT_FN(api, CreateCustomOpDomain, OrtCreateCustomOpDomainFn)(DUALBRAIN_CPU_DOMAIN, &domain))) return st;
  for (size_t i = 0; i < sizeof OPS / sizeof *OPS; i++)
    if ((st = ORT_FN(api, CustomOpDomain_Add, OrtCustomOpDomainAddFn)(domain, OPS[i]))) return st;
  return ORT_FN(api, AddCustomOpDomain, OrtAddCustomOpDomainFn)(options, domain);
}
