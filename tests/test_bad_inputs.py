"""Bad files and faults outside the server: one line, exit 1, nothing lost (issue reproducers)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import ctypes
import os
import resource
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_dataset, write_idx
from helpers import error_line, runner
from resnet_edge.cli import app
from resnet_edge.core.mnist import DataError, bundled_dir, load_dataset
from resnet_edge.training.checkpoint import load_checkpoint


def _gzip_bomb(path, mb: int) -> None:
    """A valid IDX image header claiming 10 images, then ``mb`` MB of zeros, gzip-compressed (~1000:1)."""
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunks = [z.compress(header)]
    zeros = bytes(2**20)
    for _ in range(mb):
        chunks.append(z.compress(zeros))
    chunks.append(z.flush())
    path.write_bytes(b"".join(chunks))


def test_gzip_bomb_is_refused_at_the_size_its_header_promises(tmp_path):
    folder = write_dataset(tmp_path / "d", compress=True)
    _gzip_bomb(folder / "train-images-idx3-ubyte.gz", 256)  # 256 MB of zeros behind a 7,856-byte promise
    with pytest.raises(DataError, match=r"holds more than the 7,856 bytes its IDX header promises"):
        load_dataset(folder)


def test_a_header_asking_for_terabytes_is_refused(tmp_path):
    folder = write_dataset(tmp_path / "d", compress=True)
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2**31, 28, 28))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header))
    with pytest.raises(DataError, match="more than any dataset we read"):
        load_dataset(folder)


def _sha256sum_style(folder, names):
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}" for n in names]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_sha256sums_naming_the_gz_files_is_checked(tmp_path):
    """`sha256sum *.gz > SHA256SUMS` names the compressed files; a tampered one must not load."""
    folder = tmp_path / "mnist"
    shutil.copytree(bundled_dir(), folder)
    (folder / "SHA256SUMS").unlink()
    names = sorted(p.name for p in folder.glob("*.gz"))
    _sha256sum_style(folder, names)
    load_dataset(folder)  # as written: every file matches
    labels = np.frombuffer(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8).copy()
    labels[0] = (labels[0] + 1) % 10
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", 0x801, labels, compress=True)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: SHA-256 of the file .* SHA256SUMS says"):
        load_dataset(folder)


def test_a_sha256sums_line_that_cannot_be_read_is_an_error_not_skipped(tmp_path):
    """Found by the fuzz test: a digest with a space flipped into it used to be skipped, so the
    file it named was loaded unverified."""
    folder = write_dataset(tmp_path / "d")
    names = sorted(p.name for p in folder.iterdir())
    _sha256sum_style(folder, names)
    text = (folder / "SHA256SUMS").read_text()
    (folder / "SHA256SUMS").write_text(text[:10] + " " + text[11:])
    with pytest.raises(DataError, match=r"SHA256SUMS: line 1 is not `<sha256>  <file name>`"):
        load_dataset(folder)


def test_non_utf8_sha256sums_is_one_line(tmp_path):
    folder = write_dataset(tmp_path / "d")
    (folder / "SHA256SUMS").write_bytes(b"\xff\xfe\x00garbage\n")
    line = error_line(["train", "--data-dir", folder, "--run", tmp_path / "run", "--epochs", "1"])
    assert "SHA256SUMS: not a text file" in line


def test_unreadable_data_file_is_one_line(tmp_path, monkeypatch):
    import resnet_edge.core.mnist as data

    folder = write_dataset(tmp_path / "d")
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith("train-labels-idx1-ubyte"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(data, "open", deny, raising=False)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: cannot read .Permission denied"):
        load_dataset(folder)


def _bad_checkpoint(run, tmp_path, mutate):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    mutate(ckpt)
    folder = tmp_path / "bad"
    folder.mkdir()
    torch.save(ckpt, folder / "checkpoint.pt")
    (folder / "train.json").write_text((run / "train.json").read_text())
    return folder


@pytest.mark.parametrize("name, mutate, message", [
    ("config-not-dict", lambda c: c.__setitem__("config", ["resnet8"]), "not a resnet-edge checkpoint"),
    ("model-not-dict", lambda c: c.__setitem__("model", 3), "not a resnet-edge checkpoint"),
    ("unhashable-arch", lambda c: c["config"].__setitem__("arch", ["resnet8"]), "unknown architecture"),
    ("other-arch", lambda c: c["config"].__setitem__("arch", "resnet14"), "weights do not fit resnet14"),
])
def test_checkpoints_of_the_wrong_structure(trained_run, tmp_path, name, mutate, message):
    run, _, _ = trained_run
    folder = _bad_checkpoint(run, tmp_path, mutate)
    assert message in error_line(["export", "--run", folder])
    assert message in error_line(["eval", folder / "checkpoint.pt"])
    assert not (folder / "model.onnx").exists()


def test_resume_against_a_checkpoint_of_another_shape(trained_run, tmp_path):
    run, _, _ = trained_run

    def other_weights(c):  # a resnet8 recipe whose weights are of another shape
        c["model"]["fc.weight"] = torch.zeros(3, 3)

    folder = _bad_checkpoint(run, tmp_path, other_weights)
    before = (folder / "checkpoint.pt").read_bytes()
    line = error_line(["train", "--run", folder, "--resume", "--device", "cpu"])
    assert "cannot resume from it" in line
    assert (folder / "checkpoint.pt").read_bytes() == before


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _restricted(file_size: int | None = None, read_only: bool = False):
    """A preexec_fn: a file-size limit (RLIMIT_FSIZE), and/or permission bits that hold even for root
    (tests often run as root, who writes into a read-only folder unless CAP_DAC_OVERRIDE is dropped)."""
    def preexec():
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if read_only and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return preexec


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fails_whole(args, folder, **restrict):
    """A stage under a fault: exit 1, one line `error: ...` naming the cause, ``folder`` byte-identical."""
    before = _snapshot(folder)
    proc = subprocess.run([sys.executable, "-m", "resnet_edge", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=_restricted(**restrict), timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert _snapshot(folder) == before  # no partial, stale or temporary file
    return lines[0]


def _run_copy(trained_run, tmp_path, name="run"):
    run, _, _ = trained_run
    copy = tmp_path / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("bench.*", "deploy"))
    return copy


@pytest.mark.slow  # 20 s: four stages under RLIMIT_FSIZE (the same failed atomic write as the read-only
# folder of test_read_only_run_folder_is_one_line_and_untouched, which stays in the default suite)
def test_file_size_limit_during_each_stage_is_one_line_and_leaves_the_run_whole(trained_run, tmp_path):
    """RLIMIT_FSIZE during export (the FP32 model does not fit), quantization (the FP32 model of the same
    checkpoint fits, quantize's calibration graph does not), train and bench; each on its own copy of
    the run, run side by side to keep the suite short."""
    from concurrent.futures import ThreadPoolExecutor

    copies = {name: _run_copy(trained_run, tmp_path, name) for name in ("export", "quantize", "train", "bench")}
    data = write_dataset(tmp_path / "d", n_train=64, n_test=32)
    cases = [
        (["export", "--run", copies["export"], "--quantize", "--quiet"], copies["export"], 100_000),
        (["export", "--run", copies["quantize"], "--quantize", "--quiet"], copies["quantize"],
         (copies["quantize"] / "model.onnx").stat().st_size + 4096),
        (["train", "--data-dir", data, "--run", copies["train"] / "new", "--epochs", "1", "--batch-size", "16",
          "--device", "cpu", "--quiet"], copies["train"], 50_000),
        (["bench", "--run", copies["bench"], "--no-torch", "--batch-sizes", "1", "--duration", "0.05", "--min-runs", "5",
          "--quiet"], copies["bench"], 1_000),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        lines = list(pool.map(lambda c: _fails_whole(c[0], c[1], file_size=c[2]), cases))
    assert all("File too large" in line for line in lines), lines
    assert not [p for p in (copies["train"] / "new").rglob("*") if p.is_file()]


@pytest.mark.parametrize("stage", ["train", "export", "bench"])
def test_read_only_run_folder_is_one_line_and_untouched(trained_run, tmp_path, stage):
    copy = _run_copy(trained_run, tmp_path)
    data = write_dataset(tmp_path / "d", n_train=64, n_test=32)
    args = {"train": ["train", "--data-dir", data, "--run", copy / "new", "--epochs", "1", "--batch-size", "16",
                      "--device", "cpu", "--quiet"],
            "export": ["export", "--run", copy, "--quantize", "--quiet"],
            "bench": ["bench", "--run", copy, "--no-torch", "--batch-sizes", "1", "--duration", "0.05", "--quiet"]}[stage]
    copy.chmod(0o555)
    try:
        line = _fails_whole(args, copy, read_only=True)
    finally:
        copy.chmod(0o755)
    assert "Permission denied" in line or "read-only" in line, line


def test_predict_into_a_closed_pipe_is_quiet(trained_run, tmp_path, mnist):
    run, _, _ = trained_run
    png = tmp_path / "d.png"
    Image.fromarray(mnist.test_images[0]).save(png)
    code = ("import sys; sys.argv = ['resnet-edge', 'predict'] + [sys.argv[1]] * 200 + ['--model', sys.argv[2], '--json']\n"
            "from resnet_edge.cli import app; app()")
    producer = subprocess.Popen([sys.executable, "-c", code, str(png), str(run / "model.onnx")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = producer.stdout.read(1)  # `| head -c1`
    producer.stdout.close()
    stderr = producer.stderr.read().decode()
    assert producer.wait(timeout=120) == 0 and first == b"["
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_16_bit_grayscale_png_is_scaled_not_clipped(mnist):
    from resnet_edge.inference.preprocess import image_to_pixels

    digit = mnist.test_images[0]
    buf8, buf16 = io.BytesIO(), io.BytesIO()
    Image.fromarray(digit).save(buf8, format="PNG")
    # A grey-ink scan: the digit at a quarter of full scale, 16 bits per pixel.
    Image.fromarray(digit.astype(np.uint16) * 64).save(buf16, format="PNG")
    eight, sixteen = image_to_pixels(buf8.getvalue()), image_to_pixels(buf16.getvalue())
    assert sixteen.max() > 0.9  # not "blank", not a saturated blob
    assert np.abs(eight - sixteen).mean() < 0.02


# ------------------------------------------------------------------------------------------ fuzzing
def _mutants(data: bytes, rng: np.random.Generator, n: int):
    """Seeded truncations and bit flips of ``data``."""
    for _ in range(n):
        if rng.random() < 0.5:
            yield data[:int(rng.integers(0, len(data)))]
        else:
            flipped = bytearray(data)
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
                flipped[pos] ^= 1 << int(rng.integers(0, 8))
            yield bytes(flipped)


def _fails_cleanly(args, folder):
    """The command reads a bad file: exit 1, one line on stderr, no traceback, no file in ``folder`` changed."""
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, (args, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    return 1


def test_fuzz_every_input_kind(trained_run, tmp_path, mnist):
    """Seeded truncations and bit flips of each kind of file a command reads; counts in the assertion."""
    run, _, _ = trained_run
    rng = np.random.default_rng(14)
    tried = 0
    # .onnx files -> eval
    for i, bad in enumerate(_mutants((run / "model.int8.onnx").read_bytes()[:60_000], rng, 6)):
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(bad)
        tried += _fails_cleanly(["eval", path], tmp_path)
    # checkpoints -> export (truncations: zip and pickle framing must catch every one)
    ckpt = (run / "checkpoint.pt").read_bytes()
    for i in range(6):
        folder = tmp_path / f"ckpt{i}"
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(ckpt[:int(rng.integers(0, len(ckpt) - 1))])
        tried += _fails_cleanly(["export", "--run", folder], folder)
    # IDX files (gzip and raw) under a SHA256SUMS -> train
    for compress in (True, False):
        folder = write_dataset(tmp_path / f"idx{compress}", compress=compress)
        names = sorted(p.name for p in folder.iterdir())
        _sha256sum_style(folder, names)
        target = folder / names[int(rng.integers(0, len(names)))]
        original = target.read_bytes()
        for bad in _mutants(original, rng, 4):
            if bad == original:
                continue
            target.write_bytes(bad)
            tried += _fails_cleanly(["train", "--data-dir", folder, "--run", tmp_path / "never", "--epochs", "1"], folder)
        target.write_bytes(original)
    # SHA256SUMS with flipped bits in its digests -> train (each flip: a mismatch, a bad line or not text)
    folder = write_dataset(tmp_path / "sums")
    names = sorted(p.name for p in folder.iterdir())
    _sha256sum_style(folder, names)
    sums = (folder / "SHA256SUMS").read_bytes()
    digests = [i for line_start in [0] + [k + 1 for k, c in enumerate(sums) if c == 10][:-1]
               for i in range(line_start, line_start + 64)]
    for _ in range(3):
        flipped = bytearray(sums)
        flipped[digests[int(rng.integers(0, len(digests)))]] ^= 1 << int(rng.integers(0, 8))
        if bytes(flipped).lower() == sums.lower():
            continue  # a hex letter changed case: the same digest
        (folder / "SHA256SUMS").write_bytes(bytes(flipped))
        tried += _fails_cleanly(["train", "--data-dir", folder, "--run", tmp_path / "never", "--epochs", "1"], folder)
    # images -> predict
    png = io.BytesIO()
    Image.fromarray(mnist.test_images[0]).save(png, format="PNG")
    for i, bad in enumerate(_mutants(png.getvalue(), rng, 6)):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(bad)
        result = runner.invoke(app, ["predict", str(path), "--model", str(run / "model.onnx")])
        # A damaged PNG may still decode (then it is an image like any other); it never ends in a traceback.
        assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
        if result.exit_code == 1:
            assert len(result.stderr.strip().splitlines()) == 1
        tried += 1
    assert not [p for p in (tmp_path / "never").rglob("*") if p.is_file()]  # train wrote nothing
    assert tried >= 25, tried


# ------------------------------------------------------------------------------------------ faults
def _run_files_are_consistent(folder):
    """Whole files from one checkpoint: every model and export.json name the same source, each loads."""
    import onnx

    from resnet_edge.inference.variants import check_same_checkpoint

    check_same_checkpoint(folder)  # raises on a mixed run
    for model in folder.glob("*.onnx"):
        onnx.checker.check_model(str(model))
    for report in folder.glob("*.json"):
        json.loads(report.read_text())
    if (folder / "checkpoint.pt").exists():
        torch.load(folder / "checkpoint.pt", weights_only=True)


# RESNET_EDGE_FAIL_AT_WRITE (resnet_edge/core/files.py) stops a stage at its Nth atomic write, the new
# content complete in the temporary file and not yet renamed: each write is hit exactly, on any machine.
FAIL_AT_WRITE = "RESNET_EDGE_FAIL_AT_WRITE"
# The guard loosened and the search off: what is checked here is the files, not INT8's accuracy.
QUICK_EXPORT = ["--quantize", "--no-search", "--calibration-size", "64", "--max-accuracy-drop", "100",
                "--min-agreement", "0", "--quiet"]


def _stopped_at_write(args, write: int, signal_name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, FAIL_AT_WRITE: f"{write}:{signal_name}"}
    return subprocess.run([sys.executable, "-m", "resnet_edge", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def _visible(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def _left_temporaries(folder):
    """The names of the files that atomic writes left in their temporaries: ``.model.onnx.x8k2.tmp``."""
    return sorted(p.name[1:].rsplit(".", 2)[0] for p in folder.rglob(".*.tmp"))


def _small_exported_run(tmp_path):
    """A resnet8 run of 1 epoch on 256 random digits, exported (the real run's export would evaluate
    10,000 test images each time; this one 128: what is checked here is the files)."""
    from resnet_edge.core.config import QuantizationConfig, TrainConfig
    from resnet_edge.export.onnx_export import export_run
    from resnet_edge.training.train import train

    data = write_dataset(tmp_path / "d", n_train=256, n_test=128)
    run = tmp_path / "run"
    train(TrainConfig(arch="resnet8", epochs=1, device="cpu", data_dir=str(data)), run)
    export_run(run, quantize=True, qconfig=QuantizationConfig(search=False, calibration_size=64,
                                                              max_accuracy_drop=100, min_agreement=0))
    return run


def _ctrl_c_at_write(args, write: int, monkeypatch):
    """The CLI in this process, with a real SIGINT (Ctrl-C) raised at its ``write``th atomic write. Python's
    own Ctrl-C handler is put in place first: a suite started in the background by a shell without job
    control inherits SIGINT ignored, and Python then leaves it ignored (a terminal's Ctrl-C would not
    reach such a process either)."""
    import signal

    from resnet_edge.core import files

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(files, "_writes_done", 0)
    monkeypatch.setenv(FAIL_AT_WRITE, f"{write}:SIGINT")
    try:
        return runner.invoke(app, [str(a) for a in args])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C went through the CLI as a KeyboardInterrupt")
    finally:
        monkeypatch.delenv(FAIL_AT_WRITE)
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow  # 24 s: nine exports, each stopped at its next write (test_int8_portability.py's
# test_interrupted_export_leaves_the_old_files_whole stops one in the default suite)
def test_export_stopped_at_each_write_keeps_the_previous_export_whole(tmp_path, monkeypatch):
    """`export --quantize` of a new checkpoint stopped at each of its writes in turn, by SIGKILL (a process
    of its own, nothing cleaned up) and Ctrl-C alternately, until one completes: after each stop the run
    holds the previous export byte for byte (whole files of one checkpoint), a kill leaves only the file
    it was writing, which the next start removes, Ctrl-C leaves nothing temporary; the export that
    completes holds the new checkpoint's files only."""
    import signal as signals

    from resnet_edge.core.files import file_sha256

    folder = _small_exported_run(tmp_path)
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    ckpt["model"]["fc.bias"] += 1e-3  # another checkpoint: the export files in the run are not its own
    torch.save(ckpt, folder / "checkpoint.pt")
    previous = _visible(folder)
    args = ["export", "--run", folder, *QUICK_EXPORT]
    killed_while_writing = []
    for write in range(1, 10):
        if write % 2:  # SIGKILL
            proc = _stopped_at_write(args, write, "SIGKILL")
            if proc.returncode == 0:
                break
            assert proc.returncode == -signals.SIGKILL, (proc.returncode, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
            killed_while_writing.append(_left_temporaries(folder))  # the one file being written, complete
        else:  # Ctrl-C: exit 130, one line; its own temporaries and the killed export's are gone
            result = _ctrl_c_at_write(args, write, monkeypatch)
            if result.exit_code == 0:
                break
            assert result.exit_code == 130 and len(result.stderr.strip().splitlines()) == 1, result.output
            assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporaries left behind"
        assert _visible(folder) == previous, write
        _run_files_are_consistent(folder)
    # Writes 1 and 3 were killed (2 was Ctrl-C): model.onnx, [model.int8.onnx,] export.json; 4 is not reached.
    # A new write in export shifts this list.
    assert write == 4 and killed_while_writing == [["model.onnx"], ["export.json"]], (write, killed_while_writing)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporaries left behind"
    _run_files_are_consistent(folder)
    export = json.loads((folder / "export.json").read_text())
    assert export["checkpoint"]["sha256"] == file_sha256(folder / "checkpoint.pt")
    assert export["checkpoint"]["sha256"] != json.loads(previous["export.json"])["checkpoint"]["sha256"]


def test_train_stopped_at_its_writes_resumes(tmp_path, monkeypatch):
    """Ctrl-C while epoch 2's checkpoint is being written, --resume, then SIGKILL (a process of its own)
    between the resumed epoch's checkpoint.pt and its train.json (the one moment the two files disagree),
    --resume again: each time the files hold a finished epoch whole, and the last --resume finishes."""
    folder = write_dataset(tmp_path / "d", n_train=96, n_test=32)
    run = tmp_path / "run"
    args = ["train", "--data-dir", folder, "--run", run, "--epochs", "4", "--batch-size", "32", "--device", "cpu",
            "--quiet"]
    # Each epoch writes checkpoint.pt then train.json: write 3 is epoch 2's checkpoint.
    stopped = _ctrl_c_at_write(args, 3, monkeypatch)
    assert stopped.exit_code == 130 and len(stopped.stderr.strip().splitlines()) == 1, stopped.output
    assert stopped.stderr.startswith("interrupted: "), stopped.stderr
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1  # epochs done: the first, whole
    assert json.loads((run / "train.json").read_text())["epochs_done"] == 1
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    _run_files_are_consistent(run)
    # Resumed, write 2 is epoch 2's train.json: checkpoint.pt already holds epoch 2.
    killed = _stopped_at_write(args + ["--resume"], 2, "SIGKILL")
    assert killed.returncode == -9 and "Traceback" not in killed.stderr, killed.stderr
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    assert json.loads((run / "train.json").read_text())["epochs_done"] == 1
    assert _left_temporaries(run) == ["train.json"]
    _run_files_are_consistent(run)  # a SIGKILL leaves a temporary: the next start removes it
    resumed = runner.invoke(app, [*map(str, args), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    report = json.loads((run / "train.json").read_text())
    assert report["epochs_done"] == 4 and [e["epoch"] for e in report["history"]] == [1, 2, 3, 4], report
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
