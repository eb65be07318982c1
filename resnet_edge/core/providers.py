"""Execution providers: the one vocabulary for them, however a user spells one ("cpu", "CPU",
"CPUExecutionProvider"). Every "is this the CPU/a GPU" question in the code goes through here."""

from __future__ import annotations

# Short names a user types -> ONNX Runtime's provider names. Any full provider name works too.
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "tensorrt": TENSORRT,
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def provider_name(provider: str) -> str:
    """ONNX Runtime's name for a provider however it is spelled ("cpu", "CPU", "CPUExecutionProvider")."""
    name = PROVIDER_ALIASES.get(provider.lower(), provider)
    return next((full for full in PROVIDER_ALIASES.values() if full.lower() == name.lower()), name)


def is_cpu_provider(provider: str) -> bool:
    """The one test of "is this the CPU provider", for every spelling."""
    return provider_name(provider) == CPU


def is_cuda_device_provider(provider: str) -> bool:
    """Whether the provider runs on an NVIDIA GPU (CUDA or TensorRT), for every spelling."""
    return provider_name(provider) in (CUDA, TENSORRT)


def is_tensorrt_provider(provider: str) -> bool:
    """Whether the provider is TensorRT, which builds its own engine (and its own INT8) from the model."""
    return provider_name(provider) == TENSORRT
