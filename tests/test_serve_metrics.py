"""serve for operators (issue 23): Prometheus metrics at /metrics (and --metrics-port), Triton's statistics
and model configuration extensions, read by prometheus_client's own parser and by tritonclient."""

from __future__ import annotations

import io
import signal

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import free_port, start_server
from test_serve_hardening import linear_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = linear_model(tmp_path_factory.mktemp("models") / "linear.onnx")
    grpc_port, metrics_port = free_port(), free_port()
    proc, url = start_server("--model", model, "--model-name", "m", "--max-batch-size", 8,
                             "--grpc-port", grpc_port, "--metrics-port", metrics_port)
    yield url, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _requests(samples: dict, protocol: str, code: str) -> float:
    key = ("resnet_edge_requests_total", (("code", code), ("model", "m"), ("protocol", protocol), ("version", "1")))
    return samples.get(key, 0.0)


def _send_the_mix(url: str, grpc_address: str) -> None:
    """3 JSON, 2 binary, 2 gRPC and 1 /v1/predict requests answered; 2 bad JSON ones (400) and 1 binary
    one (400); 1 for an unknown model (404: counted by no model)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    for binary, times in ((False, 3), (True, 2)):
        for _ in range(times):
            inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            http.infer("m", [inp])
    grpc = grpcclient.InferenceServerClient(grpc_address)
    for _ in range(2):
        inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        grpc.infer("m", [inp])
    png = io.BytesIO()
    Image.fromarray((x[0, 0] * 255).astype(np.uint8)).save(png, format="PNG")
    assert httpx.post(f"{url}/v1/predict", content=png.getvalue(), headers={"content-type": "image/png"}).is_success
    for body in (b"{not json", b'{"inputs": []}'):
        assert httpx.post(f"{url}/v2/models/m/infer", content=body).status_code == 400
    bad_binary = httpx.post(f"{url}/v2/models/m/infer", content=b"{}",
                            headers={"Inference-Header-Content-Length": "1"})
    assert bad_binary.status_code == 400
    assert httpx.post(f"{url}/v2/models/other/infer", json={"inputs": []}).status_code == 404


def test_metrics_count_exactly_what_was_sent(served):
    url, grpc_address, metrics_url = served
    before = _samples(httpx.get(f"{url}/metrics").text)
    _send_the_mix(url, grpc_address)
    text = httpx.get(f"{url}/metrics").text
    after = _samples(text)

    def sent(protocol: str, code: str) -> float:
        return _requests(after, protocol, code) - _requests(before, protocol, code)

    assert (sent("json", "200"), sent("binary", "200"), sent("grpc", "200"), sent("predict", "200")) == (3, 2, 2, 1)
    assert (sent("json", "400"), sent("binary", "400")) == (2, 1)
    assert not any(name == "resnet_edge_requests_total" and dict(labels)["model"] == "other" for name, labels in after)
    # the request-latency histogram counts the successes; every ONNX Runtime call is in the batch-size one
    json_count = ("resnet_edge_request_duration_seconds_count", (("model", "m"), ("protocol", "json"), ("version", "1")))
    assert after[json_count] - before.get(json_count, 0) == 3
    batches = ("resnet_edge_batch_size_count", (("model", "m"), ("version", "1")))
    rows = ("resnet_edge_batch_size_sum", (("model", "m"), ("version", "1")))
    assert after[rows] - before.get(rows, 0) == 2 * 7 + 1  # 7 requests of 2 images and one /v1/predict image
    stats = httpx.get(f"{url}/v2/models/m/stats").json()["model_stats"][0]
    assert after[batches] == stats["execution_count"]
    assert after[("resnet_edge_rows_in_flight", ())] == 0 and after[("resnet_edge_pending_request_bytes", ())] == 0
    assert after[("process_resident_memory_bytes", ())] > 10 * 2**20
    assert "# HELP resnet_edge_queue_duration_seconds" in text and "# TYPE resnet_edge_requests_total counter" in text
    # --metrics-port: the same registry on a port of its own
    separate = _samples(httpx.get(f"{metrics_url}/metrics").text)
    assert _requests(separate, "json", "200") == _requests(after, "json", "200")


def test_no_metrics_turns_metrics_off_and_keeps_statistics(tmp_path):
    from helpers import error_line

    model = linear_model(tmp_path / "m.onnx")
    line = error_line(["serve", "--model", model, "--no-metrics", "--metrics-port", free_port()])
    assert "--no-metrics" in line
    proc, url = start_server("--model", model, "--model-name", "m", "--no-metrics")
    try:
        x = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [0.5] * 784}]}
        assert httpx.post(f"{url}/v2/models/m/infer", json=x).status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 404
        stats = httpx.get(f"{url}/v2/models/m/stats").json()["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_tritonclient_reads_statistics_and_config_over_http(served):
    import tritonclient.http as httpclient

    url, grpc_address, _ = served
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    assert {"statistics", "model_configuration"} <= set(client.get_server_metadata()["extensions"])
    before = client.get_inference_statistics("m")["model_stats"][0]
    _send_the_mix(url, grpc_address)
    after = client.get_inference_statistics("m", "1")["model_stats"][0]
    everything = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in everything] == ["m"]

    def grew(*path: str) -> int:
        a, b = after, before
        for key in path:
            a, b = a[key], b[key]
        return a - b

    assert grew("inference_stats", "success", "count") == 8  # 3 JSON, 2 binary, 2 gRPC, 1 /v1/predict
    assert grew("inference_stats", "fail", "count") == 3  # the 400s; the unknown model's 404 is no model's
    assert grew("inference_count") == 15  # images: 7 x 2 + 1
    assert 1 <= grew("execution_count") <= 8
    assert grew("inference_stats", "success", "ns") > 0 and grew("inference_stats", "compute_infer", "ns") > 0
    assert after["last_inference"] >= before["last_inference"] > 0
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    config = client.get_model_config("m")
    assert config["name"] == "m" and config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 8
    assert config["input"][0] == {"name": "pixels", "data_type": "TYPE_FP32", "format": "FORMAT_NONE",
                                  "dims": [1, 28, 28]}
    assert config["output"][0]["dims"] == [10] and "dynamic_batching" in config
    assert httpx.get(f"{url}/v2/models/other/config").status_code == 404
    assert httpx.get(f"{url}/v2/models/m/versions/2/stats").status_code == 404


def test_tritonclient_reads_statistics_and_config_over_grpc(served):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url, grpc_address, _ = served
    client = grpcclient.InferenceServerClient(grpc_address)
    before = client.get_inference_statistics("m", as_json=True)["model_stats"][0]
    _send_the_mix(url, grpc_address)
    after = client.get_inference_statistics("m", "1", as_json=True)["model_stats"][0]
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [s["name"] for s in every] == ["m"]
    # protobuf's JSON writes 64-bit counts as strings
    success = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    assert success == 8 and int(after["inference_count"]) - int(before["inference_count"]) == 15
    http_view = httpx.get(f"{url}/v2/models/m/stats").json()["model_stats"][0]
    assert int(after["execution_count"]) <= http_view["execution_count"]  # the same counters, read later by HTTP
    config = client.get_model_config("m", as_json=True)["config"]
    assert config["name"] == "m" and config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == ["1", "28", "28"] and config["input"][0]["data_type"] == "TYPE_FP32"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("other")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_a_scrape_never_sees_a_histogram_sum_ahead_of_its_count():
    """The event loop observes while a scrape (another thread) reads: every scrape's _sum is that of the
    observations its _count holds (each observation is 1.0 here, so the two are equal)."""
    import sys
    import threading

    from resnet_edge.serving.statistics import Metrics

    metrics = Metrics(lambda: 0, lambda: 0)
    model = metrics.bind("m", "1")
    stop = threading.Event()

    def observe():
        while not stop.is_set():
            model.request_done("json", 200, 1.0, 1.0)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
    writer = threading.Thread(target=observe)
    writer.start()
    try:
        mismatched = checked = 0
        for _ in range(3000):
            for family in metrics.collect():
                if family.type != "histogram":
                    continue
                values = {s.name: s.value for s in family.samples if s.labels.get("protocol") == "json"}
                if values:
                    checked += 1
                    mismatched += values[f"{family.name}_sum"] != values[f"{family.name}_count"]
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(switch)
    assert checked >= 3000 and mismatched == 0  # every scrape saw the json histograms
