"""8- and 4-bit weight-only quantization for sparse decode.

- ``primitives``: the format math (codes, scales, packing); a leaf the kernels import;
- ``tensors``: ``Int8Weight``/``Int4Weight``, the tensor subclasses a quantized model holds, and
  torchao's int8 tensors converted to them;
- ``model``: ``quantize_model``/``dequantize_model``/``quantization_of``, what
  ``attach(..., weights=...)`` runs (import it from ``wisparse_compile.quant.model``; the package
  imports only the two layers below it, so ``config`` can import the primitives).

``QuantizeConfig`` lives with the other configs (``wisparse_compile.config``).
"""

from .primitives import (
    INT4_GROUP_SIZE,
    WEIGHT_FORMATS,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from .tensors import WEIGHT_CLASSES, Int4Weight, Int8Weight, QuantizedWeight, from_torchao, weight_format

__all__ = [
    "INT4_GROUP_SIZE", "WEIGHT_CLASSES", "WEIGHT_FORMATS", "Int4Weight", "Int8Weight", "QuantizedWeight",
    "dequantize_int4", "dequantize_int8", "from_torchao", "quantize_int4", "quantize_int8", "unpack_int4",
    "weight_format",
]
