"""A runtime-only CPU kernel for the full-attention layers: ONNX `Attention` (grouped-query heads, boolean mask)
reading the runtime's sequence-major K/V cache in place. No export identity: the exported graph keeps the
standard `Attention` node over Transpose(Concat(past, new)) that TensorRT fuses, which the ONNX Runtime backend
rewrites at load (runtime/backends/ort_kernels.py)."""
