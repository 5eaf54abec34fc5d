"""The ``rtinfer`` command: exit codes, the summary document, and signals in a real process."""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rtinfer import __version__
from rtinfer.cli import main

PROCESS_SAFETY = 60.0  # seconds: a safety net for a subprocess, never a timing assertion


def pipeline_file(
    tmp_path: Path, model: str, *, follow: bool = False, extra: str = "", n: int = 20
) -> Path:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        "".join(json.dumps({"id": f"e{i}", "x": (i % 10) / 10, "y": 1.0}) + "\n" for i in range(n))
    )
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"""\
name: cli
source:
  type: file
  path: {inputs}
  checkpoint: {tmp_path / "checkpoint"}
  follow: {"true" if follow else "false"}
decode:
  fields: {{id: str, x: float, y: float}}
stages:
  - type: vectorize
    fields: [x, y]
model:
  {model}
decision:
  thresholds: {{review: 0.5, block: 0.9}}
sinks:
  - type: file
    path: {tmp_path / "out.jsonl"}
{extra}"""
    )
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- in process ----------------------------------------------------------------------------


def test_check_accepts_a_good_file(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = pipeline_file(tmp_path, f"path: {model_file}")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok (4 stages)" in out
    assert not (tmp_path / "out.jsonl").exists()  # checking runs nothing


@pytest.mark.parametrize(
    ("model", "extra", "code", "message"),
    [
        ("path: MODEL", "runtime: {read_siz: 3}\n", 2, "unknown key 'read_siz'"),
        ("path: MODEL\n  factory: 'a:b'", "", 2, "give exactly one of path"),
        ("path: MODEL", "name: ${RTINFER_TEST_UNSET}\n", 2, "RTINFER_TEST_UNSET is not set"),
        ("factory: 'rtinfer_no_such:thing'", "", 2, "cannot import module 'rtinfer_no_such'"),
        ("path: /nonexistent/model.onnx", "", 1, "'/nonexistent/model.onnx' does not exist"),
    ],
)
def test_check_reports_errors_on_stderr_with_an_exit_code(
    tmp_path: Path,
    model_file: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    extra: str,
    code: int,
    message: str,
) -> None:
    path = pipeline_file(tmp_path, model.replace("MODEL", str(model_file)), extra=extra)
    assert main(["check", str(path)]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert message in captured.err
    assert str(path) in captured.err or code == 1


def test_check_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert "pipeline file not found" in capsys.readouterr().err


def test_run_writes_the_summary_json(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = pipeline_file(
        tmp_path,
        f"path: {model_file}",
        n=30,
        extra=f"dead_letters: {{type: file, path: {tmp_path / 'dead.jsonl'}}}\n",
    )
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write('{"id": "bad", "x": "high", "y": 1.0}\n')
    summary_path = tmp_path / "reports" / "summary.json"
    assert gc.get_freeze_count() == 0
    assert main(["run", str(path), "--summary-json", str(summary_path), "--no-live"]) == 0
    assert gc.get_freeze_count() > 0  # start-up's objects were put out of the GC's walks
    summary = json.loads(summary_path.read_text())
    assert set(summary) == {
        "events_in",
        "events_out",
        "dead_letters",
        "skipped",
        "duration_s",
        "throughput_eps",
        "latency_ms",
        "batch_size_mean",
    }
    assert (summary["events_in"], summary["events_out"], summary["dead_letters"]) == (31, 30, 1)
    assert set(summary["latency_ms"]) == {"p50", "p99", "p999", "max"}
    assert all(v >= 0 for v in summary["latency_ms"].values())
    assert summary["batch_size_mean"] > 0
    assert summary["duration_s"] >= 0
    assert summary["throughput_eps"] >= 0
    assert json.loads(capsys.readouterr().out) == summary  # also printed
    results = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in results] == [f"e{i}" for i in range(30)]
    assert [r["decision"] for r in results[:10]] == ["approve"] * 5 + ["review"] * 4 + ["block"]
    # Undecodable: no id of its own, so its position names it.
    assert [d["id"] for d in read_jsonl(tmp_path / "dead.jsonl")] == [
        f"file://{tmp_path / 'in.jsonl'}/0/30"
    ]
    assert (tmp_path / "checkpoint").read_text().strip() == "31"


def test_run_of_a_model_that_cannot_load_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx graph")
    path = pipeline_file(tmp_path, f"path: {broken}")
    assert main(["run", str(path), "--no-live"]) == 1
    assert "could not load" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rtinfer {__version__}"
    # `python -m rtinfer` runs the same command.
    monkeypatch.setattr(sys, "argv", ["rtinfer", "--version"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("rtinfer", run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rtinfer {__version__}"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2
    assert "usage: rtinfer" in capsys.readouterr().err


# -- signals, in a real process ------------------------------------------------------------


def start(path: Path, helpers_dir: Path, tmp_path: Path, delay: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(helpers_dir), env.get("PYTHONPATH", "")])
    env["RTINFER_TEST_DELAY"] = str(delay)
    with (tmp_path / "stdout.txt").open("wb") as out, (tmp_path / "stderr.txt").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "rtinfer", "run", str(path), "--no-live",
             "--summary-json", str(tmp_path / "summary.json")],
            stdout=out,
            stderr=err,
            env=env,
            cwd=tmp_path,
        )  # fmt: skip


def wait_for(process: subprocess.Popen[bytes], condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PROCESS_SAFETY
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def finish(process: subprocess.Popen[bytes], tmp_path: Path) -> int:
    try:
        return process.wait(PROCESS_SAFETY)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(
            "the process did not exit; stderr: " + (tmp_path / "stderr.txt").read_text()
        ) from None


def test_sigterm_drains_and_exits_0(tmp_path: Path, helpers_dir: Path) -> None:
    path = pipeline_file(
        tmp_path,
        "factory: rtinfer_testhelpers:slow_model\n  batching: {max_batch_size: 5}",
        follow=True,  # the source never ends: only the signal stops the run
        n=400,
        extra="runtime: {read_size: 5, max_in_flight: 3}\n",
    )
    out = tmp_path / "out.jsonl"
    process = start(path, helpers_dir, tmp_path, delay=0.01)
    wait_for(process, lambda: bool(read_jsonl(out)), "the first results")
    process.send_signal(signal.SIGTERM)
    code = finish(process, tmp_path)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 0, stderr
    assert "SIGTERM: stopping intake" in stderr

    results = read_jsonl(out)
    n = len(results)
    assert [r["id"] for r in results] == [f"e{i}" for i in range(n)]  # in order, no gap
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["events_in"] == summary["events_out"] == n  # every line read was written
    assert (tmp_path / "checkpoint").read_text().strip() == str(n)  # and acknowledged


def test_a_second_sigint_exits_at_once_with_130(tmp_path: Path, helpers_dir: Path) -> None:
    path = pipeline_file(
        tmp_path,
        "factory: rtinfer_testhelpers:slow_model\n  batching: {max_batch_size: 1}",
        follow=True,
        n=50,
        extra="runtime: {read_size: 1, max_in_flight: 8}\n",
    )
    out = tmp_path / "out.jsonl"
    stderr_path = tmp_path / "stderr.txt"
    # Each event takes the model 0.3 s: after the first signal, draining the batches in
    # flight takes seconds, so the second signal arrives while the pipeline drains.
    process = start(path, helpers_dir, tmp_path, delay=0.3)
    wait_for(process, lambda: bool(read_jsonl(out)), "the first results")
    process.send_signal(signal.SIGINT)
    wait_for(process, lambda: "stopping intake" in stderr_path.read_text(), "the first signal")
    process.send_signal(signal.SIGINT)
    code = finish(process, tmp_path)
    stderr = stderr_path.read_text()
    assert code == 130, stderr
    assert "SIGINT again: exiting at once" in stderr
    assert not (tmp_path / "summary.json").exists()  # it did not wait to finish
    # Nothing was acknowledged that was not written: the rest is read again next time.
    written = len(read_jsonl(out))
    assert written < 50
    checkpoint = tmp_path / "checkpoint"
    acknowledged = int(checkpoint.read_text()) if checkpoint.exists() else 0
    assert acknowledged <= written


def test_an_unexpected_library_error_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rtinfer.cli

    class BrokerDown(Exception):
        pass

    def fail(coro: Any) -> None:
        coro.close()  # never run: the broker is "down"
        raise BrokerDown("connection refused")

    monkeypatch.setattr(rtinfer.cli, "_run", fail)
    monkeypatch.delenv("RTINFER_DEBUG", raising=False)
    path = tmp_path / "p.yaml"
    path.write_text("{}")
    assert main(["run", str(path), "--no-live"]) == 1
    err = capsys.readouterr().err
    assert "BrokerDown: connection refused" in err
    assert "Traceback" not in err
