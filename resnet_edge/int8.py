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

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError
from .machine import CpuInfo

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

    def metadata(self) -> dict[str, Any]:
        low, high = (-PORTABLE_MAX_ABS_WEIGHT, PORTABLE_MAX_ABS_WEIGHT) if self.reduce_range else (-127, 127)
        return {"name": self.name, "format": "QDQ", "activation_type": self.activation_type,
                "weight_type": "int8", "weight_range": [low, high], "per_channel_weights": True,
                "requires_cpu": REQUIREMENT if self.requires_int8_dot_product else None,
                "summary": self.summary}


REQUIREMENT = ("int8 dot-product instructions (x86: AVX512-VNNI, AVX-VNNI or AMX; ARM: dotprod); "
               "on x86 CPUs without them (AVX2, AVX-512F) its 8-bit weights saturate and accuracy drops")

SCHEMES = {
    "portable": Scheme("portable", "uint8", True, False,
                       "uint8 activations, int8 weights limited to [-64, 64]: no int8 kernel of any CPU can "
                       "saturate, so the accuracy measured at export holds on every CPU"),
    "vnni": Scheme("vnni", "uint8", False, True,
                   "uint8 activations, full 8-bit weights: exact only on CPUs with int8 dot-product "
                   "instructions (VNNI, AMX, ARM dotprod)"),
    "s8s8": Scheme("s8s8", "int8", True, False,
                   "int8 activations, int8 weights limited to [-64, 64]; ONNX Runtime on x86 fuses fewer "
                   "of its convolutions than with uint8 activations (usually slower)"),
}
DEFAULT_SCHEME = "portable"


def scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise UserError(f"--scheme must be one of {', '.join(SCHEMES)}, got {name!r}")
    return SCHEMES[name]


@dataclass(frozen=True)
class WeightAudit:
    """What the file itself says about saturation, whatever its metadata claims."""

    activation_types: tuple[str, ...]  # element types of the quantized activations (uint8 / int8)
    max_abs_weight: int  # over every int8 weight feeding a Conv, Gemm or MatMul
    weights_checked: int
    saturation_free: bool  # no uint8 x int8 pair sum can leave int16 on any CPU

    def worst_pair_sum(self) -> int:
        return 2 * UINT8_MAX * self.max_abs_weight


def audit_weights(proto: Any) -> WeightAudit | None:
    """Inspect a QDQ model: the activation types and the largest |int8 weight| of every Conv/Gemm/MatMul.
    None for a model with no quantized weights (FP32)."""
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    weight_inputs = set()
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(node.input) > 1:
            weight_inputs.add(node.input[1])
        if node.op_type in ("QLinearConv", "QLinearMatMul") and len(node.input) > 3:
            weight_inputs.add(node.input[3])
        if node.op_type in ("ConvInteger", "MatMulInteger") and len(node.input) > 1:
            weight_inputs.add(node.input[1])
    max_abs, checked = 0, 0
    for name in weight_inputs:
        source = name
        dq = producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            source = dq.input[0]
        tensor = inits.get(source)
        if tensor is None or tensor.data_type != TensorProto.INT8:
            continue
        w = numpy_helper.to_array(tensor).astype(np.int32)
        if w.size:
            max_abs = max(max_abs, int(np.abs(w).max()))
            checked += 1
    if not checked:
        return None
    act_types = set()
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None:
                act_types.add({TensorProto.UINT8: "uint8", TensorProto.INT8: "int8"}.get(zp.data_type, "other"))
    return WeightAudit(tuple(sorted(act_types)), max_abs, checked,
                       2 * UINT8_MAX * max_abs <= INT16_MAX)


def model_scheme(proto: Any) -> dict[str, Any] | None:
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        return json.loads(props["int8_scheme"]) if "int8_scheme" in props else None
    except ValueError:
        return None


def cpu_problem(proto: Any, cpu: CpuInfo) -> str | None:
    """Why this INT8 model would give different answers on ``cpu`` than where it was measured, or None.

    Judged from the weights in the file (not only the metadata): a model whose uint8 x int8 pair sums
    can leave int16 is only exact on a CPU with int8 dot-product instructions.
    """
    audit = audit_weights(proto)
    if audit is None or audit.saturation_free or cpu.int8_dot_product:
        return None
    return (f"this INT8 model has weights up to |{audit.max_abs_weight}| (pair sums up to {audit.worst_pair_sum():,}, "
            f"past int16's 32,767) and needs {REQUIREMENT}; this CPU ({cpu.model}) has none, so its answers "
            "would differ from the accuracy measured at export. Re-export with the default "
            "`--scheme portable`, or use the FP32 model")
