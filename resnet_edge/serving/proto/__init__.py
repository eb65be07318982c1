"""The Open Inference Protocol's gRPC messages, built at run time from Triton's own .proto.

grpc_service.proto and model_config.proto are Triton's (triton-inference-server/common, protobuf/, commit
83adf7cf, BSD-3-Clause, their license in their headers): package `inference`, service
GRPCInferenceService, KServe v2's calls with Triton's extensions (ModelConfig, ModelStatistics, ...), of
which this server answers the ones it lists in METHODS. grpc_service.binpb is their compiled
FileDescriptorSet, made once at development time with

    python -m grpc_tools.protoc -I resnet_edge/serving/proto --include_imports \
        --descriptor_set_out=resnet_edge/serving/proto/grpc_service.binpb \
        resnet_edge/serving/proto/grpc_service.proto

The classes live in a private descriptor pool: no generated code to keep in step with a protobuf
version, and no clash with another copy of the same messages in the process (tritonclient's, for one).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

SERVICE = "inference.GRPCInferenceService"
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)


@lru_cache(maxsize=1)
def messages() -> dict[str, Any]:
    """Short message name ('ModelInferRequest', ...) -> its class."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    files = descriptor_pb2.FileDescriptorSet.FromString((Path(__file__).parent / "grpc_service.binpb").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    service = pool.FindServiceByName(SERVICE)
    classes = {}
    for method in (service.FindMethodByName(name) for name in METHODS):
        for descriptor in (method.input_type, method.output_type):
            classes[descriptor.name] = message_factory.GetMessageClass(descriptor)
    return classes
