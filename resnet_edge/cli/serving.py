"""`serve` (Open Inference Protocol over HTTP and gRPC, /v1/predict) and `package` (Triton, KServe, ORT)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from resnet_edge.cli.app import app
from resnet_edge.cli.console import MODEL, RUN, VARIANT_HELP, console, note, user_errors
from resnet_edge.core.config import PackageConfig, ServerConfig
from resnet_edge.core.contract import DEPLOY_DIR
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import resolve_run

OUT = typer.Option(
    None, "--out", "-o", help="Deployment folder to write (default: <run>/deploy): triton/, kserve.yaml, ort/."
)
TRITON_MAX_BATCH = typer.Option(PackageConfig.max_batch_size, help="Triton max_batch_size (the dynamic batch).")
QUEUE_DELAY = typer.Option(PackageConfig.queue_delay_us, help="Triton dynamic batching queue delay (microseconds).")
KIND = typer.Option(PackageConfig.kind, help="Triton instance_group kind: cpu | gpu.")
TRITON_INSTANCES = typer.Option(PackageConfig.instances, help="Model instances per Triton server.")
TRITON_THREADS = typer.Option(
    PackageConfig.threads, help="ONNX Runtime intra-op threads per instance (0: its default)."
)
STORAGE_URI = typer.Option(PackageConfig.storage_uri, help="Where KServe will find the repository (kserve.yaml).")
ORT = typer.Option(PackageConfig.ort, help="Also write ORT-format models (parity-checked) for minimal builds.")

VARIANT = typer.Option("auto", help=VARIANT_HELP)
REPOSITORY = typer.Option(
    None,
    help="A Triton model repository (`resnet-edge package` writes <run>/deploy/triton): serves every model and "
    "version in it (with --model-name, that model only at start).",
)
MODEL_NAME = typer.Option(
    None, help="Name in the URLs (default: the architecture; with --repository, the one model to load at start)."
)
MODEL_CONTROL = typer.Option(
    ServerConfig.model_control,
    help="none | explicit: with explicit, POST /v2/repository/models/{name}/load and /unload (and gRPC's) "
    "load and unload a --repository's models while the server runs.",
)
HOST = typer.Option(ServerConfig.host, help="Address to listen on.")
PORT = typer.Option(ServerConfig.port, help="Port to listen on.")
PROVIDER = typer.Option(ServerConfig.provider, help="ONNX Runtime execution provider.")
THREADS = typer.Option(None, help="ONNX Runtime intra-op threads.")
INSTANCES = typer.Option(
    ServerConfig.instances, help="Batches ONNX Runtime runs at once (a new batch gathers while they run)."
)
MAX_BATCH = typer.Option(ServerConfig.max_batch_size, help="Most rows per ONNX Runtime call (1 turns batching off).")
MAX_DELAY = typer.Option(
    ServerConfig.max_delay_ms,
    help="How long a batch waits for company once an instance is free (0: it starts at once with what queued "
    "while the instances were busy).",
)
MAX_BODY = typer.Option(ServerConfig.max_body_bytes, help="Larger request bodies get 413.")
MAX_QUEUE = typer.Option(ServerConfig.max_queue, help="Images (rows) accepted and not answered yet; beyond this: 503.")
MAX_PENDING = typer.Option(ServerConfig.max_pending_bytes, help="Request bytes in flight together; beyond this: 503.")
MAX_CONNECTIONS = typer.Option(ServerConfig.max_connections, help="Connections and requests at once; beyond this: 503.")
CLIENT_TIMEOUT = typer.Option(
    ServerConfig.client_timeout, help="Seconds a client has to send its headers, and its body."
)
METRICS_PORT = typer.Option(
    ServerConfig.metrics_port,
    help="Also serve /metrics (Prometheus) on this port, as Triton's :8002; 0: on --port only.",
)
METRICS = typer.Option(
    ServerConfig.metrics, "--metrics/--no-metrics", help="Prometheus metrics at /metrics (statistics stay on)."
)
GRPC_PORT = typer.Option(ServerConfig.grpc_port, help="Port of the gRPC GRPCInferenceService (KServe v2); 0: no gRPC.")


@app.command("package")
@user_errors
def package_cli(
    run: Path | None = RUN,
    out: Path | None = OUT,
    max_batch_size: int = TRITON_MAX_BATCH,
    queue_delay_us: int = QUEUE_DELAY,
    kind: str = KIND,
    instances: int = TRITON_INSTANCES,
    threads: int = TRITON_THREADS,
    storage_uri: str = STORAGE_URI,
    ort: bool = ORT,
) -> None:
    """Write a Triton model repository, a KServe InferenceService and ORT-format models from the run."""
    from resnet_edge.deploy.package import package_run

    config = PackageConfig(
        max_batch_size=max_batch_size,
        queue_delay_us=queue_delay_us,
        kind=kind,
        instances=instances,
        threads=threads,
        storage_uri=storage_uri,
        ort=ort,
    )
    run_dir = resolve_run(run)
    report = package_run(run_dir, out or run_dir / DEPLOY_DIR, config)
    lines = [f"Triton repository ({', '.join(report['models'])}): {report['repository']}; KServe: {report['kserve']}"]
    lines += [
        f"ORT format {variant}: same outputs as the .onnx (max |diff| {diff:.1e})"
        for variant, diff in report["ort_parity_max_abs_diff"].items()
    ]
    console.print("\n".join(lines), soft_wrap=True)


@app.command("serve")
@user_errors
def serve_cli(
    run: Path | None = RUN,
    model: Path | None = MODEL,
    variant: str = VARIANT,
    repository: Path | None = REPOSITORY,
    model_name: str | None = MODEL_NAME,
    host: str = HOST,
    port: int = PORT,
    provider: str = PROVIDER,
    threads: int | None = THREADS,
    instances: int = INSTANCES,
    max_batch_size: int = MAX_BATCH,
    max_delay_ms: float = MAX_DELAY,
    max_body_bytes: int = MAX_BODY,
    max_queue: int = MAX_QUEUE,
    max_pending_bytes: int = MAX_PENDING,
    max_connections: int = MAX_CONNECTIONS,
    client_timeout: float = CLIENT_TIMEOUT,
    grpc_port: int = GRPC_PORT,
    metrics_port: int = METRICS_PORT,
    metrics: bool = METRICS,
    model_control: str = MODEL_CONTROL,
) -> None:
    """Serve the model: Open Inference Protocol (KServe v2) over HTTP (JSON and binary tensors) and gRPC,
    and /v1/predict for image files."""
    from resnet_edge.serving.server import serve

    config = ServerConfig(
        model_name=model_name, provider=provider, threads=threads, instances=instances,
        max_batch_size=max_batch_size, max_delay_ms=max_delay_ms, max_queue=max_queue, max_body_bytes=max_body_bytes,
        max_pending_bytes=max_pending_bytes, max_connections=max_connections, client_timeout=client_timeout,
        host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port, metrics=metrics,
        repository=repository, model_control=model_control,
    )  # fmt: skip  # checked before any model is read
    _choose_served_model(config, run, model, variant, repository)
    serve(config, announce=_announce)


def _choose_served_model(
    config: ServerConfig, run: Path | None, model: Path | None, variant: str, repository: Path | None
) -> None:
    from resnet_edge.core.providers import is_cpu_provider
    from resnet_edge.inference.variants import select_model

    if not is_cpu_provider(config.provider):
        from resnet_edge.inference.runtime import check_provider_available

        check_provider_available(config.provider)  # a missing execution provider is one line, before any model
    if repository is None:
        choice, _ = select_model(run, model, variant, "throughput", config.provider)
        if model is None:  # a file the user named needs no announcement
            note(f"using {choice.path} ({choice.reason})")
        config.model_path = choice.path
        return
    if run is not None or model is not None or variant != "auto":
        raise UserError("--repository serves its models by name; give it without --run, --model or --variant")


def _announce(c: ServerConfig, models: Any) -> None:
    from resnet_edge.core.names import printable
    from resnet_edge.serving.models import LOADING, failure_line

    grpc = f" and gRPC on {c.host}:{c.grpc_port}" if c.grpc_port else ""
    grpc += f", /metrics also on {c.host}:{c.metrics_port}" if c.metrics_port else ""
    instances = f"{c.instances} instance{'s' if c.instances > 1 else ''}"
    settings = f"(max batch {c.max_batch_size}, max delay {c.max_delay_ms:g} ms, {instances} a model)"
    if c.repository is None:
        note(f"serving {c.model_path} as {c.model_name!r} on http://{c.host}:{c.port}/v2/models/{c.model_name}{grpc} "
             f"{settings}")  # fmt: skip
        return
    for m in models.all():
        if m.failed:
            note(f"warning: {failure_line(m)}")
    served = [f"{m.name} (version {m.version})" for m in models.all() if m.state == LOADING]
    note(
        f"serving {', '.join(served)} of {printable(c.repository)} on http://{c.host}:{c.port}/v2/models{grpc} "
        f"{settings}; /v1/predict and the page at / use {models.default}; model control: {c.model_control}"
    )
