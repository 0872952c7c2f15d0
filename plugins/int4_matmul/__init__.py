"""A runtime-only CPU kernel for the int4 linears of `export --quant int4`: y = x @ dequantize(W) on the
weight with eight rows interleaved (the layout of ``Int4MoEDispatch``), int8 activations per block of 32
as in ONNX Runtime's MatMulNBits. No export identity: the exported graph keeps the portable
DequantizeLinear -> MatMul, which the ONNX Runtime backend rewrites at load (runtime/backends/ort_kernels.py)."""
