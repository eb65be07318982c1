"""The models `serve` serves: one file (--model, --run), or every model and version of a Triton-layout
repository (--repository), each with its own ONNX Runtime session, batcher and statistics; what the routes
look up by name and version (Triton's model states READY, UNAVAILABLE, LOADING, UNLOADING); and the model
repository extension's index, load and unload (--model-control explicit), which replace or drain a
model while the others keep serving. The server's limits (--max-queue rows, --max-pending-bytes,
--max-connections) are shared by every model: more models never means more memory per request.
No torch here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.config import ServerConfig
from resnet_edge.core.contract import TRITON_MODEL_FILE
from resnet_edge.core.errors import UserError
from resnet_edge.core.names import check_name, is_name, printable, shown
from resnet_edge.core.providers import is_cpu_provider
from resnet_edge.core.repository import RepositoryModel, model_folders, scan_model, scan_repository
from resnet_edge.inference.variants import default_model
from resnet_edge.serving.batcher import DynamicBatcher, RowBudget
from resnet_edge.serving.loading import model_metadata, open_session, triton_model_config
from resnet_edge.serving.statistics import Metrics, Recorder
from resnet_edge.serving.v2 import RequestError

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
DRAIN_S = 30.0  # an unload (or a reload's old version) waits this long for its requests in flight


class NotLoaded(RequestError):
    """A model of the repository that is not loaded (unloaded, or failed): 404 over HTTP, UNAVAILABLE over gRPC."""

    def __init__(self, message: str) -> None:
        super().__init__(404, message)

    def __reduce__(self) -> Any:
        return (NotLoaded, (str(self),))


class ServedModel:
    """One version of one model: its session and batcher once loaded, its state, statistics and metadata."""

    def __init__(self, name: str, version: str, path: Path | None) -> None:
        self.name, self.version, self.path = name, version, path
        self.state, self.reason = UNAVAILABLE, "not loaded"
        self.failed = False  # its load failed, or it broke its contract while serving (503, not NotLoaded)
        self.session: Any = None
        self.batcher: DynamicBatcher | None = None
        self.metadata: dict[str, Any] = {}
        self.model_config: dict[str, Any] = {}
        self.recorder: Recorder | None = None
        self.holding = 0  # requests that took this version (ModelTable.serving) and are not answered yet

    @property
    def ready(self) -> bool:
        return self.state == READY

    def __enter__(self) -> ServedModel:
        """``with table.serving(name, version) as model``: the request holds this version from its lookup
        to its answer, body and parsing included, so that an unload or a reload waits for it (DRAIN_S)."""
        self.holding += 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.holding -= 1

    def loaded(self, session: Any, metadata: dict[str, Any], model_config: dict[str, Any], recorder: Recorder) -> None:
        self.session, self.metadata, self.model_config, self.recorder = session, metadata, model_config, recorder
        self.state, self.reason, self.failed = LOADING, "", False

    def fail(self, reason: str) -> None:
        self.state, self.reason, self.failed, self.session = UNAVAILABLE, reason, True, None

    def start(self, config: ServerConfig, budget: RowBudget, on_death: Callable[[str], None]) -> None:
        """Start its batcher on the running loop: READY."""
        assert self.recorder is not None
        self.batcher = DynamicBatcher(
            self.session,
            config.max_batch_size,
            config.max_delay_ms,
            config.max_queue,
            io_binding=not is_cpu_provider(config.provider),
            on_death=on_death,
            instances=config.instances,
            on_batch=self.recorder.batch_done,
            budget=budget,
        )
        self.batcher.start()
        self.state = READY

    async def stop(self, drain_s: float = 0.0, reason: str = "unloaded") -> None:
        """UNLOADING (new requests are refused), then up to ``drain_s`` for the requests that hold it (from
        their lookup on: a body still arriving counts), then its batcher stopped and its session freed."""
        self.state = UNLOADING
        batcher, loop = self.batcher, asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        try:
            while self.holding and loop.time() < deadline:
                await asyncio.sleep(0.01)
            if batcher is not None:
                await batcher.stop()
        finally:  # cancelled or not, it ends unloaded: nothing left half-stopped
            self.batcher, self.session, self.metadata, self.model_config = None, None, {}, {}
            self.state, self.reason, self.failed = UNAVAILABLE, reason, False

    async def infer(self, pixels: np.ndarray, timing: list[int]) -> np.ndarray:
        """The logits of ``pixels``; a request that took this version before an unload began is still
        answered (READY or UNLOADING), one that comes after was refused by ModelTable.serving."""
        if self.batcher is None:
            raise self.not_ready()
        started = time.perf_counter_ns()
        try:
            return await self.batcher.infer(pixels)
        finally:
            timing[0] += time.perf_counter_ns() - started

    def request_done(self, protocol: str, code: int, started_ns: int, batcher_ns: int) -> None:
        """One request for this version answered with ``code``: counted by its statistics and metrics (a
        version that never loaded has none)."""
        if self.recorder is not None:
            self.recorder.request_done(protocol, code, started_ns, batcher_ns)

    def not_ready(self) -> RequestError:
        what = f"model {self.name!r} version {self.version}"
        if self.state == UNAVAILABLE and not self.failed:
            return NotLoaded(f"{what} is not loaded ({self.reason})")
        reason = f": {self.reason}" if self.reason else ""
        return RequestError(503, f"{what} is not ready ({self.state.lower()}{reason})")


class ModelTable:
    """The served models by name and version, as the routes and the gRPC front look them up."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None) -> None:
        self.config = config
        self.metrics = metrics
        self.models: dict[str, dict[str, ServedModel]] = {}
        self.budget = RowBudget(config.max_queue)  # shared by every batcher
        self.default: str | None = None  # the model /v1/predict and the page use without ?model=
        self.changing = asyncio.Lock()  # one load or unload at a time
        self.changes: set[asyncio.Task] = set()  # loads and unloads under way (kept from the garbage collector)

    def add(self, model: ServedModel) -> None:
        self.models.setdefault(model.name, {})[model.version] = model
        self.models[model.name] = dict(sorted(self.models[model.name].items(), key=lambda kv: int(kv[0] or 0)))

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def names(self) -> str:
        return ", ".join(repr(n) for n in self.models) or "none"

    def lookup(self, name: str, version: str | None = None) -> ServedModel:
        """The model and version a URL names (no version: its highest ready version, else its highest); 404."""
        versions = self.models.get(name)
        if not versions:
            raise RequestError(404, f"unknown model {shown(name)}; this server serves {self.names()}")
        if not version:
            ready = [m for m in versions.values() if m.ready]
            return (ready or list(versions.values()))[-1]
        if version not in versions:
            raise RequestError(
                404, f"unknown version {shown(version)} of {name!r}; it has version {', '.join(versions)}"
            )
        return versions[version]

    def serving(self, name: str, version: str | None = None) -> ServedModel:
        """The model to infer with: looked up, and READY (else NotLoaded, or 503 while it loads or unloads)."""
        model = self.lookup(name, version)
        if not model.ready:
            raise model.not_ready()
        return model

    def described(self, name: str, version: str | None = None) -> ServedModel:
        """The model whose metadata and configuration a URL asks for: looked up, and loaded (whatever its
        readiness); else its not-ready error (an unloaded model has nothing to describe)."""
        model = self.lookup(name, version)
        if not model.metadata:
            raise model.not_ready()
        return model

    def predict_model(self, name: str | None, version: str | None) -> ServedModel:
        if name is None and self.default is None:
            raise RequestError(404, "no model to answer with; give ?model=<name>")
        return self.serving(name or self.default or "", version)

    @property
    def ready(self) -> bool:
        """Whether some model is served. A model that failed (to load, or while serving) does not make the
        server unready, as it would with Triton's --strict-readiness: the others are served; its own
        readiness and the repository index say so."""
        return any(m.ready for m in self.all())

    def chosen(self, name: str | None, version: str | None) -> list[ServedModel]:
        """What Triton's statistics call names: every version served (no name), a model's versions (no
        version), or one; 404 for a model or version the server does not know."""
        if not name:
            return self.all()
        if not version:
            return list(self.models[self.lookup(name).name].values())
        return [self.lookup(name, version)]

    def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton's model_stats of what ``chosen`` names."""
        return [m.recorder.statistics.triton_json() for m in self.chosen(name, version) if m.recorder is not None]

    @property
    def rows_waiting(self) -> int:
        return sum(m.batcher.callers_waiting for m in self.all() if m.batcher is not None)

    def index(self, on_disk: Sequence[str] = ()) -> list[dict[str, str]]:
        """Triton's repository index: every version with its state and why it is not ready; and the
        models ``on_disk`` that the server has not seen yet (a folder added since it started)."""
        known = [
            {"name": m.name, "version": m.version, "state": m.state, "reason": printable(m.reason, 300)}
            for m in self.all()
        ]
        return known + [{"name": n, "version": "", "state": "", "reason": ""} for n in on_disk if n not in self.models]

    def recorder(self, name: str, version: str) -> Recorder:
        return Recorder(name, version, self.metrics)

    def open(self, name: str, version: str, path: Path, versions: list[str]) -> ServedModel:
        """One version of a repository model with its session opened and checked (LOADING), or failed with
        the reason: blocking, run in a thread once the server runs."""
        model = ServedModel(name, version, path)
        try:
            if path.resolve() != path:  # resolved when the repository was read: a link put in since then
                raise UserError(f"{TRITON_MODEL_FILE} of version {version} changed into a link since it was read")
            session = open_session(self.config, path, saturation=True)
        except Exception as exc:  # a model file is untrusted: whatever it does, the others are served
            model.fail(str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
            return model
        metadata = model_metadata(name, versions, dict(session.get_modelmeta().custom_metadata_map))
        model.loaded(session, metadata, triton_model_config(self.config, name, True), self.recorder(name, version))
        return model

    def open_all(self, entry: RepositoryModel) -> list[ServedModel]:
        """Every version of a scanned repository model, opened (blocking); one failed entry for a model
        whose folder is wrong."""
        if entry.problem is not None:
            failed = ServedModel(entry.name, "", None)
            failed.fail(entry.problem)
            return [failed]
        return [self.open(entry.name, v, path, list(entry.versions)) for v, path in entry.versions.items()]

    def install(self, models: list[ServedModel], on_death: Callable[[ServedModel, str], None]) -> list[ServedModel]:
        """Put ``models`` (one model's versions) in the table and start those that opened (on the running
        loop); the versions they replace are returned, to be stopped by the caller."""
        name = models[0].name
        old = list(self.models.pop(name, {}).values())
        for m in models:
            self.add(m)
            if m.state == LOADING:
                m.start(self.config, self.budget, functools.partial(on_death, m))
        return old

    async def load(self, repository: Path, name: str, on_death: Callable[[ServedModel, str], None]) -> None:
        """Triton's load: (re)read the model's folder, open every version, then swap them in while the old
        versions finish what they hold. All or nothing: if a version fails, nothing of this load is
        served and the answer is 400; a served old version stays served, else the failure is what the
        index shows. The change runs to its end even if the caller goes away (a gRPC deadline)."""
        await self._owned(self._load(repository, name, on_death))

    async def unload(self, name: str) -> None:
        """Triton's unload: every version of ``name`` refuses new requests, finishes those in flight (up
        to DRAIN_S), and stops; it stays in the index as UNAVAILABLE, 'unloaded'. Runs to its end even if
        the caller goes away."""
        await self._owned(self._unload(name))

    async def _owned(self, change: Any) -> None:
        """``change`` as a task of the table, awaited through a shield: a cancelled caller does not cancel it."""
        task = asyncio.ensure_future(change)
        self.changes.add(task)
        task.add_done_callback(self.changes.discard)
        await asyncio.shield(task)

    async def _load(self, repository: Path, name: str, on_death: Callable[[ServedModel, str], None]) -> None:
        async with self.changing:
            loop = asyncio.get_running_loop()
            entry = await loop.run_in_executor(None, _scan_one, repository, name)
            models = await loop.run_in_executor(None, self.open_all, entry)
            failed = [m for m in models if m.failed]
            if failed:
                if not any(m.ready for m in self.models.get(name, {}).values()):
                    self.models.pop(name, None)  # nothing served: the index shows why, version by version
                    for m in models:
                        if not m.failed:
                            m.state, m.reason, m.session = UNAVAILABLE, "another version of the load failed", None
                        self.add(m)
                    raise RequestError(400, failure_line(failed[0]))
                raise RequestError(400, f"{failure_line(failed[0])}; the loaded versions stay served")
            old = self.install(models, on_death)
            await asyncio.gather(*(m.stop(DRAIN_S, "replaced by a load") for m in old if m.batcher is not None))

    async def _unload(self, name: str) -> None:
        async with self.changing:
            self.lookup(name)  # 404 for a model the server does not know
            await asyncio.gather(*(m.stop(DRAIN_S) for m in self.models[name].values()))


def check_control(model_control: str, parameters: Any) -> None:
    """A load or unload: allowed with --model-control explicit. Of Triton's parameters, unload_dependents
    means nothing here (no ensembles) and is accepted; config and file overrides are refused, not ignored."""
    if model_control != "explicit":
        raise RequestError(
            403, "model control is 'none': serve --repository DIR --model-control explicit loads and unloads"
        )
    if not isinstance(parameters, dict) and not hasattr(parameters, "keys"):
        raise RequestError(400, "'parameters' must be an object")
    unsupported = [str(k)[:40] for k in parameters.keys() if k != "unload_dependents"]
    if unsupported:
        raise RequestError(400, f"load and unload parameter {unsupported[0]!r} is not supported by this server")


def names_on_disk(repository: Path | None) -> list[str]:
    """The names of the repository's model folders now (a folder added since start shows in the index;
    one whose name breaks the rule of names.py cannot be served and is left out); [] on error."""
    if repository is None:
        return []
    try:
        return [p.name for p in model_folders(repository) if is_name(p.name)]
    except (UserError, OSError):
        return []


def _scan_one(repository: Path, name: str) -> RepositoryModel:
    if not is_name(name) or not (repository / name).is_dir():
        raise RequestError(404, f"no model {shown(name)} in the repository")
    try:
        return scan_model(repository, repository / name)
    except UserError as exc:
        return RepositoryModel(name, problem=str(exc))
    except OSError as exc:  # removed or made unreadable since the check above
        return RepositoryModel(name, problem=f"its folder cannot be read ({exc.strerror or type(exc).__name__})")


def failure_line(model: ServedModel) -> str:
    version = f" version {model.version}" if model.version else ""
    return f"model {model.name!r}{version} failed to load: {printable(model.reason, 300)}"


def start_repository(table: ModelTable, repository: Path, only: str | None) -> list[ServedModel]:
    """At start-up (before the loop runs): scan the repository and open every model (``only``: that one,
    as --model-name says). Failures are the table's failed entries; none served at all is a UserError."""
    entries = scan_repository(repository)
    if only is not None:
        check_name(only, "--model-name")
        if only not in entries:
            raise UserError(f"{printable(repository)}: no model {shown(only)}; it holds {', '.join(entries)}")
        for name, entry in entries.items():  # in the index, loadable with --model-control explicit
            for version, path in entry.versions.items() if name != only else ():
                table.add(ServedModel(name, version, path))
        entries = {only: entries[only]}
    opened = [m for entry in entries.values() for m in table.open_all(entry)]
    for m in opened:
        table.add(m)
    table.default = default_model([m.name for m in opened if m.state == LOADING], table.config.provider)
    if not any(m.state == LOADING for m in opened):
        first = opened[0]
        raise UserError(f"{printable(repository)}: no model could be loaded ({failure_line(first)})")
    return opened
