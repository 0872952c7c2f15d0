/* The part of ONNX Runtime's C ABI that dualbrain's CPU kernels use, declared here so that they build
 * with nothing but a C compiler (the onnxruntime wheel ships no headers).
 *
 * ONNX Runtime's `OrtApi` is a table of function pointers that only ever grows at its end, so an
 * entry's index is fixed once released. The indices below were counted from onnxruntime_c_api.h
 * (ORT_API_VERSION 13 and 29 agree on every one of them); the tests check them by running the kernels
 * against numpy. ORT_API_CALL is empty on Linux and macOS; Windows is not supported here.
 */
#ifndef DUALBRAIN_ORT_ABI_H
#define DUALBRAIN_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef struct OrtApi OrtApi;
typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;

typedef struct OrtApiBase {
  const OrtApi *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} OrtApiBase;

enum { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
/* ONNXTensorElementDataType; an op's input declared UNDEFINED takes any type (the kernel checks it) */
enum { ORT_TENSOR_UNDEFINED = 0, ORT_TENSOR_FLOAT = 1, ORT_TENSOR_UINT8 = 2, ORT_TENSOR_BOOL = 9, ORT_TENSOR_FLOAT16 = 10 };
enum { ORT_IO_REQUIRED = 0 };        /* OrtCustomOpInputOutputCharacteristic */
enum { ORT_MEM_DEFAULT = 0 };        /* OrtMemType */

/* the OrtApi version asked for: KernelContext_ParallelFor and shape inference came in 1.17 */
#define DUALBRAIN_ORT_API_VERSION 17

/* OrtApi entries, by index */
#define ORT_CreateStatus 0
#define ORT_GetErrorMessage 2
#define ORT_CreateCustomOpDomain 26
#define ORT_CustomOpDomain_Add 27
#define ORT_AddCustomOpDomain 28
#define ORT_GetTensorMutableData 51
#define ORT_GetTensorElementType 60
#define ORT_GetDimensionsCount 61
#define ORT_GetDimensions 62
#define ORT_GetTensorTypeAndShape 65
#define ORT_KernelInfoGetAttribute_int64 86
#define ORT_KernelContext_GetInput 90
#define ORT_KernelContext_GetOutput 91
#define ORT_ReleaseStatus 93
#define ORT_ReleaseTensorTypeAndShapeInfo 99
#define ORT_ShapeInferContext_GetInputTypeShape 268
#define ORT_ShapeInferContext_SetOutputTypeShape 270
#define ORT_KernelContext_ParallelFor 274

typedef OrtStatus *(*OrtCreateStatusFn)(int code, const char *msg);
typedef OrtStatus *(*OrtCreateCustomOpDomainFn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*OrtCustomOpDomainAddFn)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*OrtAddCustomOpDomainFn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*OrtGetTensorMutableDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*OrtGetTensorElementTypeFn)(const OrtTensorTypeAndShapeInfo *info, int *out);
typedef OrtStatus *(*OrtGetDimensionsCountFn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*OrtGetDimensionsFn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);
typedef OrtStatus *(*OrtGetTensorTypeAndShapeFn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*OrtKernelInfoGetAttributeInt64Fn)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*OrtKernelContextGetInputFn)(const OrtKernelContext *ctx, size_t index, const OrtValue **out);
typedef OrtStatus *(*OrtKernelContextGetOutputFn)(OrtKernelContext *ctx, size_t index, const int64_t *dims,
                                                   size_t n, OrtValue **out);
typedef void (*OrtReleaseStatusFn)(OrtStatus *status);
typedef void (*OrtReleaseTensorTypeAndShapeInfoFn)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*OrtShapeInferGetInputFn)(const OrtShapeInferContext *ctx, size_t index,
                                              OrtTensorTypeAndShapeInfo **info);
typedef OrtStatus *(*OrtShapeInferSetOutputFn)(const OrtShapeInferContext *ctx, size_t index,
                                               const OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*OrtParallelForFn)(const OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total,
                                       size_t num_batch, void *user);

/* ORT_FN(api, Name): the entry `Name` of `api`, typed */
#define ORT_FN(api, name, type) ((type)(((void *const *)(api))[ORT_##name]))

/* OrtCustomOp up to the fields of version 17 (ORT reads no field newer than an op's `version`) */
typedef struct OrtCustomOp {
  uint32_t version;
  void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
  const char *(*GetName)(const struct OrtCustomOp *op);
  const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
  int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
  int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
  void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
  int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
  OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                               void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
  OrtStatus *(*InferOutputShapeFn)(const struct OrtCustomOp *op, OrtShapeInferContext *ctx);
  int (*GetStartVersion)(const struct OrtCustomOp *op);
  int (*GetEndVersion)(const struct OrtCustomOp *op);
} OrtCustomOp;

#endif
