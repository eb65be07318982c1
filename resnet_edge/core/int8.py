"""INT8 schemes and what they need from the CPU that runs them, checked on the model file itself.

Why a scheme matters: with uint8 activations and int8 weights (U8S8), ONNX Runtime's x86 kernels on
CPUs without VNNI (AVX2, AVX-512F) multiply with VPMADDUBSW, which adds two uint8 x int8 products into
a *saturating* int16. Two products of 255 x 127 sum to 64,770, far past 32,767, so a model whose
weights use the full int8 range gives different (worse) answers on such a CPU than on one with VNNI,
AMX or ARM's dot-product instructions, which accumulate in 32 bits. Weights limited to [-64, 64]
cannot saturate anywhere: 255 x 64 + 255 x 64 = 32,640 <= 32,767 (ONNX Runtime's ``reduce_range``,
documented by it for exactly this case). That is our default, "portable".

Torch-free: runtime code (eval, serve, predict, bench) reads the scheme from the model's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from resnet_edge.core.errors import UserError
from resnet_edge.core.machine import CpuInfo

# The largest |weight| that can never saturate a uint8 x int8 pair sum in int16: 2 * 255 * 64 = 32,640.
PORTABLE_MAX_ABS_WEIGHT = 64
INT16_MAX = 32767
UINT8_MAX = 255


@dataclass(frozen=True)
class Scheme:
    name: str
    activation_type: str  # uint8 | int8
    reduce_range: bool  # 7-bit weights in [-64, 64]
    requires_int8_dot_product: bool
    summary: str

    def metadata(self, per_channel: bool = True) -> dict[str, Any]:
        low, high = (-PORTABLE_MAX_ABS_WEIGHT, PORTABLE_MAX_ABS_WEIGHT) if self.reduce_range else (-127, 127)
        return {
            "name": self.name,
            "format": "QDQ",
            "activation_type": self.activation_type,
            "weight_type": "int8",
            "weight_range": [low, high],
            "per_channel_weights": per_channel,
            "requires_cpu": REQUIREMENT if self.requires_int8_dot_product else None,
            "summary": self.summary,
        }


REQUIREMENT = (
    "int8 dot-product instructions on x86 (AVX512-VNNI, AVX-VNNI or AMX), or an ARM CPU; "
    "on x86 CPUs without them (AVX2, AVX-512F) its 8-bit weights saturate and accuracy drops"
)

SCHEMES = {
    "portable": Scheme(
        "portable",
        "uint8",
        True,
        False,
        "uint8 activations, int8 weights limited to [-64, 64]: no int8 kernel of any CPU can "
        "saturate, so the accuracy measured at export holds on every CPU",
    ),
    "vnni": Scheme(
        "vnni",
        "uint8",
        False,
        True,
        "uint8 activations, full 8-bit weights: exact only on x86 CPUs with VNNI or AMX, and on ARM",
    ),
    "s8s8": Scheme(
        "s8s8",
        "int8",
        True,
        False,
        "int8 activations, int8 weights limited to [-64, 64]; ONNX Runtime on x86 fuses fewer "
        "of its convolutions than with uint8 activations (usually slower)",
    ),
}


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise UserError(f"--scheme must be one of {', '.join(SCHEMES)}, got {name!r}")
    return SCHEMES[name]


@dataclass(frozen=True)
class WeightAudit:
    """What the file itself says about saturation, whatever its metadata claims."""

    max_abs_weight: int  # over every int8 weight feeding a Conv, Gemm or MatMul
    weights_checked: int
    saturation_free: bool  # no uint8 x int8 pair sum can leave int16 on any CPU

    def worst_pair_sum(self) -> int:
        return 2 * UINT8_MAX * self.max_abs_weight


# Integer-math consumers and the inputs that may carry weights; shape-only ops we look through.
_WEIGHT_INPUTS = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "QLinearConv": (3,),
    "QLinearMatMul": (0, 3),
    "ConvInteger": (1,),
    "MatMulInteger": (0, 1),
    "QGemm": (0, 3),
    "MatMulIntegerToFloat": (0, 1),
    "DynamicQuantizeMatMul": (1,),
}
_PASS_THROUGH = {"Transpose", "Reshape", "Identity", "Flatten", "Squeeze", "Unsqueeze"}
_QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QGemm",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}


def audit_weights(proto: Any) -> WeightAudit | None:
    """The largest |int8 weight| of every Conv/Gemm/MatMul (through DequantizeLinear and shape-only ops).
    None for a float model (no quantized op at all). A quantized graph whose weights cannot be found is
    reported as not saturation-free: unknown is never taken for safe."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    if not any(n.op_type in _QUANTIZED_OPS for n in graph.node):
        return None
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    max_abs, checked, seen = 0, 0, set()
    for node in graph.node:
        for index in _WEIGHT_INPUTS.get(node.op_type, ()):
            if index >= len(node.input):
                continue
            name = node.input[index]
            for _ in range(8):  # walk back through shape-only ops and DequantizeLinear
                producer = producers.get(name)
                if producer is None or producer.op_type not in _PASS_THROUGH | {"DequantizeLinear"}:
                    break
                name = producer.input[0]
            tensor = inits.get(name)
            if tensor is None or name in seen or tensor.data_type != TensorProto.INT8:
                continue
            seen.add(name)
            w = numpy_helper.to_array(tensor).astype(np.int32)
            if w.size:
                max_abs = max(max_abs, int(np.abs(w).max()))
                checked += 1
    if not checked:
        return WeightAudit(max_abs_weight=127, weights_checked=0, saturation_free=False)
    return WeightAudit(max_abs, checked, 2 * UINT8_MAX * max_abs <= INT16_MAX)


def cpu_problem(proto: Any, cpu: CpuInfo) -> str | None:
    """Why this INT8 model would give different answers on ``cpu`` than where it was measured, or None.

    Judged from the weights in the file (not only the metadata): a model whose uint8 x int8 pair sums
    can leave int16 is only exact on a CPU with int8 dot-product instructions.
    """
    audit = audit_weights(proto)
    if audit is None or audit.saturation_free or not cpu.u8s8_saturates:
        return None
    found = (
        f"weights up to |{audit.max_abs_weight}| (pair sums up to {audit.worst_pair_sum():,}, past int16's 32,767)"
        if audit.weights_checked
        else "quantized weights we cannot locate"
    )
    return (
        f"this INT8 model has {found} and needs {REQUIREMENT}; this CPU ({cpu.model}) has none, so its answers "
        "would differ from the accuracy measured at export. Re-export with the default "
        "`--scheme portable`, or use the FP32 model"
    )
