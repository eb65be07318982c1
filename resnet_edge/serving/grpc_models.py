"""The gRPC calls about models rather than inference, for grpc_front.GrpcServer: ModelReady, ModelMetadata,
ModelConfig (Triton's configuration extension), ModelStatistics (Triton's statistics extension) and
Triton's model repository extension (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload). Each
answers what its HTTP route answers (routes.py), from the same ModelTable. No torch here."""

from __future__ import annotations

from typing import Any

from resnet_edge.core.contract import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES
from resnet_edge.serving.models import check_control, names_on_disk
from resnet_edge.serving.proto import messages
from resnet_edge.serving.v2 import OUTPUTS


def _version(version: str) -> str | None:
    return version or None  # gRPC's empty string: no version asked for


async def model_ready(front: Any, cls: Any, context: Any) -> Any:
    request = await front.request(cls, context)
    model = front.state.models.lookup(request.name, _version(request.version))
    return messages()["ModelReadyResponse"](ready=front.state.model_is_ready(model))


async def model_metadata(front: Any, cls: Any, context: Any) -> Any:
    request = await front.request(cls, context)
    meta = front.state.models.described(request.name, _version(request.version)).metadata
    response = messages()["ModelMetadataResponse"](
        name=meta["name"], versions=meta["versions"], platform=meta["platform"]
    )
    response.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[-1, *INPUT_SHAPE])
    for name in OUTPUTS:
        response.outputs.add(name=name, datatype="FP32", shape=[-1, NUM_CLASSES])
    return response


async def model_config(front: Any, cls: Any, context: Any) -> Any:
    """Triton's ModelConfig: the model's configuration (as GET .../config answers it)."""
    from google.protobuf import json_format

    request = await front.request(cls, context)
    model = front.state.models.described(request.name, _version(request.version))
    response = messages()["ModelConfigResponse"]()
    json_format.ParseDict(model.model_config, response.config)
    return response


async def model_statistics(front: Any, cls: Any, context: Any) -> Any:
    """Triton's ModelStatistics (as GET .../stats answers its model_stats); no name: every model."""
    from google.protobuf import json_format

    request = await front.request(cls, context)
    response = messages()["ModelStatisticsResponse"]()
    stats = front.state.models.statistics(request.name, request.version)
    json_format.ParseDict({"model_stats": stats}, response)
    return response


async def repository_index(front: Any, cls: Any, context: Any) -> Any:
    request = await front.request(cls, context)
    state = front.state
    on_disk = await state.work(names_on_disk, state.config.repository)
    response = messages()["RepositoryIndexResponse"]()
    for entry in state.models.index(on_disk):
        if entry["state"] == "READY" or not request.ready:
            response.models.add(**entry)
    return response


def _check_control(front: Any, request: Any) -> None:
    check_control(front.config.model_control, request.parameters)


async def repository_model_load(front: Any, cls: Any, context: Any) -> Any:
    request = await front.request(cls, context)
    _check_control(front, request)
    state = front.state
    await state.models.load(state.config.repository, request.model_name, state.model_died)
    return messages()["RepositoryModelLoadResponse"]()


async def repository_model_unload(front: Any, cls: Any, context: Any) -> Any:
    request = await front.request(cls, context)
    _check_control(front, request)
    await front.state.models.unload(request.model_name)
    return messages()["RepositoryModelUnloadResponse"]()


CALLS = {
    "ModelReady": model_ready,
    "ModelMetadata": model_metadata,
    "ModelConfig": model_config,
    "ModelStatistics": model_statistics,
    "RepositoryIndex": repository_index,
    "RepositoryModelLoad": repository_model_load,
    "RepositoryModelUnload": repository_model_unload,
}
