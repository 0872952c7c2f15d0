"""A runtime-only CPU kernel for the int8 linears of `export --quant int8`: y = x @ dequantize(W) with
the activations as int16 (ONNX Runtime's MatMulNBits quantizes them to int8, which costs agreement with
fp32). No export identity: the exported graph keeps the portable DequantizeLinear -> MatMul, which the
ONNX Runtime backend rewrites at load (runtime/backends/ort_kernels.py)."""
