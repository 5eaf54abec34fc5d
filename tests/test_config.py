"""Pipeline files: interpolation, error messages that point at the key, and building them."""

from __future__ import annotations

import asyncio
import functools
import json
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conftest import SAFETY, payload
from rtinfer.broker import Broker
from rtinfer.build import build_pipeline, load_pipeline
from rtinfer.config import interpolate, load_config, parse_config
from rtinfer.exceptions import ConfigError, ModelLoadError

MINIMAL = """\
source: {type: file, path: in.jsonl}
model: {path: model.onnx}
sinks: [{type: stdout}]
"""


def config_error(text: str, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, file="pipe.yaml", **kw)
    return info.value


# -- interpolation -------------------------------------------------------------------------


def test_interpolation_of_variables_defaults_and_dollars() -> None:
    env = {"TOPIC": "payments", "EMPTY": "", "SIZE": "64"}
    text = (
        "a: ${TOPIC}\n"
        "b: ${MISSING:-fallback}\n"
        "c: ${EMPTY:-used when empty}\n"
        "d: ${EMPTY-kept empty}\n"
        "e: ${MISSING-used when unset}\n"
        "f: $$HOME and $${TOPIC} and 5$\n"
        "g: ${MISSING:-}\n"
        "h: ${TOPIC:-not used}\n"
    )
    assert interpolate(text, env) == (
        "a: payments\n"
        "b: fallback\n"
        "c: used when empty\n"
        "d: \n"
        "e: used when unset\n"
        "f: $HOME and ${TOPIC} and 5$\n"
        "g: \n"
        "h: payments\n"
    )


def test_an_interpolated_value_is_typed_by_yaml() -> None:
    text = MINIMAL + "model: {path: m.onnx, batching: {max_batch_size: ${BATCH:-32}}}\n"
    config = parse_config(text.replace("model: {path: model.onnx}\n", ""), environ={})
    assert config.model.batching.max_batch_size == 32
    config = parse_config(text.replace("model: {path: model.onnx}\n", ""), environ={"BATCH": "8"})
    assert config.model.batching.max_batch_size == 8


def test_an_unset_variable_without_default_names_file_line_and_variable() -> None:
    text = MINIMAL + "name: ok\nruntime:\n  read_size: ${READ_SIZE}\n"
    error = config_error(text, environ={})
    assert error.file == "pipe.yaml"
    message = str(error)
    assert message.startswith("pipe.yaml: ")
    assert "line 6" in message
    assert "READ_SIZE is not set" in message
    assert "${READ_SIZE:-default}" in message  # says how to fix it


def test_a_malformed_variable_is_refused() -> None:
    error = config_error(MINIMAL + "name: ${not a name}\n", environ={})
    assert "line 4" in str(error)
    assert "'${not a name}' is not a valid variable" in str(error)


# -- YAML and structure errors -------------------------------------------------------------


def test_malformed_yaml_names_line_and_column() -> None:
    error = config_error("source: {type: file, path: x\nmodel: {path: m.onnx}\n")
    assert error.file == "pipe.yaml"
    assert "line 2, column 6: invalid YAML" in str(error)
    error = config_error("source:\n  type: file\n   path: x\n")
    assert "line 3" in str(error)


def test_a_file_that_is_not_a_mapping() -> None:
    assert "found list" in str(config_error("- source\n- model\n"))
    assert "found NoneType" in str(config_error("# nothing here\n"))


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        (
            "model: {path: m.onnx, batching: {max_batchsize: 3}}",
            "model.batching.max_batchsize",
            "unknown key 'max_batchsize'; did you mean 'max_batch_size'?",
        ),
        ("nmae: x", "nmae", "unknown key 'nmae'; did you mean 'name'?"),
        (
            "runtime: {zzz: 1}",
            "runtime.zzz",
            "expected one of read_size, max_in_flight, flush_interval_ms",
        ),
        ("dead_letters: {type: file, pth: x}", "dead_letters.pth", "did you mean 'path'?"),
        ("stages: [{type: vectorize, fields: [x], dtyp: f}]", "stages.0.dtyp", "'dtype'"),
    ],
)
def test_an_unknown_key_is_an_error_naming_the_dotted_key(
    extra: str, key: str, message: str
) -> None:
    text = (
        MINIMAL.replace("model: {path: model.onnx}\n", "") if extra.startswith("model") else MINIMAL
    )
    error = config_error(text + extra + "\n")
    assert error.key == key
    assert f"at key '{key}'" in str(error)
    assert message in str(error)


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        (
            "runtime: {read_size: lots}",
            "runtime.read_size",
            "Expected `int`, got `str`, found 'lots'",
        ),
        (
            "decision: {thresholds: {review: 0.5, block: high}}",
            "decision.thresholds.block",
            "Expected `float`, got `str`, found 'high'",
        ),
        ("sinks: {type: stdout}", "sinks", "Expected `array`, got `object`"),
        (
            "source: {type: pulsar, topic: t}",
            "source.type",
            "'pulsar'; use one of memory, file, redis, nats, kafka, mqtt",
        ),
        ("decode: {codec: xml}", "decode.codec", "'xml'; use one of json, msgpack, raw"),
        ("decode: {fields: {amount: double}}", "decode.fields.amount", "use one of any, bool"),
        ("sinks: [{type: file}]", "sinks.0.path", "missing required key 'path'"),
        ("runtime: {read_size: 0}", "runtime", "read_size must be at least 1, got 0"),
    ],
)
def test_a_wrong_value_names_key_expected_and_found(extra: str, key: str, message: str) -> None:
    base = MINIMAL
    first = extra.split(":")[0]
    base = "".join(line + "\n" for line in MINIMAL.splitlines() if not line.startswith(first))
    error = config_error(base + extra + "\n")
    assert error.key == key
    assert message in str(error)


def test_the_model_section_is_required_with_exactly_one_of_path_and_factory() -> None:
    no_model = MINIMAL.replace("model: {path: model.onnx}\n", "")
    error = config_error(no_model)
    assert error.key == "model"
    assert "missing required key 'model'" in str(error)
    both = no_model + "model: {path: m.onnx, factory: 'pkg.mod:make'}\n"
    error = config_error(both)
    assert error.key == "model"
    assert "give exactly one of path (a model file) or factory" in str(error)
    neither = no_model + "model: {name: m}\n"
    assert "give exactly one of path" in str(config_error(neither))
    schema_and_fields = MINIMAL + "decode: {schema: 'a:B', fields: {x: float}}\n"
    assert "either schema (an import path) or fields, not both" in str(
        config_error(schema_and_fields)
    )


def test_load_config_reads_the_file_and_names_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(MINIMAL + "name: ${NAME:-from-default}\n")
    assert load_config(path, environ={}).name == "from-default"
    assert load_config(path, environ={"NAME": "named"}).name == "named"
    with pytest.raises(ConfigError, match="pipeline file not found") as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.file == str(tmp_path / "absent.yaml")


# -- building: import paths and model files ------------------------------------------------


def write_pipeline(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.usefixtures("helpers_dir")
@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ("stages: [{type: python, use: 'no_such_module_xyz:Stage'}]", "stages.0.use",
         "cannot import module 'no_such_module_xyz'"),
        ("stages: [{type: vectorize, fields: [x]}, {type: python, use: 'rtinfer.stages:Nope'}]",
         "stages.1.use", "module 'rtinfer.stages' has no attribute 'Nope'"),
        ("stages: [{type: python, use: 'rtinfer.stages.Vectorize'}]", "stages.0.use",
         "expected 'package.module:name'"),
        ("stages: [{type: python, use: 'rtinfer.stages:Vectorize', args: {colour: red}}]",
         "stages.0.use", "cannot build 'rtinfer.stages:Vectorize' with args"),
        ("stages: [{type: python, use: 'rtinfer.exceptions:__doc__'}]", "stages.0.use",
         "which is not a stage"),
        ("stages: [{type: vectorize, fields: [x], dtype: floaty}]", "stages.0.dtype",
         "data type 'floaty' not understood"),
        ("decode: {schema: 'rtinfer_testhelpers:Missing'}", "decode.schema",
         "has no attribute 'Missing'"),
        ("decode: {schema: 'rtinfer_testhelpers:slow_model'}", "decode.schema",
         "is not a type msgspec can decode into"),
    ],
)  # fmt: skip
def test_bad_import_paths_name_the_key(
    tmp_path: Path, model_file: Path, section: str, key: str, message: str
) -> None:
    path = write_pipeline(tmp_path, MINIMAL.replace("model.onnx", str(model_file)) + section + "\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert info.value.key == key
    assert info.value.file == str(path)
    assert message in str(info.value)


@pytest.mark.usefixtures("helpers_dir")
def test_model_factories(tmp_path: Path) -> None:
    base = MINIMAL.replace("model: {path: model.onnx}\n", "")
    bad = write_pipeline(tmp_path, base + "model: {factory: 'rtinfer_nothing_here:make'}\n")
    with pytest.raises(ConfigError, match="cannot import module") as info:
        load_pipeline(bad)
    assert info.value.key == "model.factory"

    wrong = write_pipeline(tmp_path, base + "model: {factory: 'rtinfer_testhelpers:not_a_model'}\n")
    with pytest.raises(ConfigError, match="returned int; it must return a model file path") as info:
        load_pipeline(wrong)
    assert info.value.key == "model.factory"

    good = write_pipeline(tmp_path, base + "model: {factory: 'rtinfer_testhelpers:slow_model'}\n")
    pipeline = load_pipeline(good)
    assert [type(s).__name__ for s in pipeline.stages] == ["Decode", "Predict", "Outputs"]


def test_a_missing_model_file_is_found_when_the_pipeline_is_built(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, MINIMAL.replace("model.onnx", "models/absent.onnx"))
    with pytest.raises(ModelLoadError, match=r"'models/absent\.onnx' does not exist") as info:
        load_pipeline(path)
    assert str(path) in str(info.value)


# -- building and running whole files ------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_a_full_file_builds_and_runs_end_to_end(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    lines = [
        b'{"id": "low", "x": 0.1, "y": 1, "card": "c1"}',
        b'{"id": "mid", "x": 0.5, "y": 1, "card": "c2"}',
        b'{"id": "high", "x": 0.95, "y": 1, "card": "c3"}',
        b'{"id": "edge", "x": 0.9, "y": 1, "card": "c4"}',
        b'{"id": "typo", "x": "0.9", "y": 1, "card": "c5"}',
        b"not json at all",
        b'{"id": "nocard", "x": 0.2, "y": 1}',
        b"",
        b'{"id": "inf", "x": 1e300, "y": 1, "card": "c6"}',
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setenv("RTINFER_TEST_BLOCK_AT", "0.9")
    path = write_pipeline(
        tmp_path,
        f"""\
        # A fraud-like pipeline over files.
        name: e2e
        source:
          type: file
          path: in/events.jsonl
          checkpoint: state/checkpoint
        decode:
          fields: {{id: str, x: float, y: int, card: str}}
        stages:
          - type: vectorize
            fields: [x, y]
        model:
          path: {model_file}
          version: v1
          batching: {{max_batch_size: 4, max_delay_ms: 0}}
        decision:
          output: probabilities
          thresholds:
            review: 0.5
            block: ${{RTINFER_TEST_BLOCK_AT}}
          include: [card]
        sinks:
          - type: file
            path: out/decisions.jsonl
        dead_letters:
          type: file
          path: out/dead.jsonl
        runtime:
          read_size: 3
          max_in_flight: 2
          flush_interval_ms: 0
        """,
    )
    pipeline = load_pipeline(path)
    summary = await asyncio.wait_for(pipeline.run(), SAFETY)

    results = read_jsonl(tmp_path / "out" / "decisions.jsonl")
    assert [(r["id"], r["decision"], r["card"]) for r in results] == [
        ("low", "approve", "c1"),
        ("mid", "review", "c2"),
        ("high", "block", "c3"),
        ("edge", "block", "c4"),  # exactly at the threshold: earns it
    ]
    assert all(r["model_version"] == "v1" for r in results)
    assert results[1]["score"] == pytest.approx(0.5)
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert [(d["offset"], d["stage"]) for d in dead] == [
        (4, "decode"),
        (5, "decode"),
        (6, "decode"),
        (8, "model"),
    ]
    assert "missing required field `card`" in dead[2]["reason"]
    assert dead[1]["value"] == "not json at all"
    assert all(d["source"] == "file://in/events.jsonl" for d in dead)
    assert (summary.events_in, summary.events_out, summary.dead_letters) == (8, 4, 4)
    assert (tmp_path / "state" / "checkpoint").read_text().strip() == "9"


@pytest.mark.usefixtures("helpers_dir")
async def test_memory_source_and_sink_with_a_python_stage(model_file: Path) -> None:
    config = parse_config(
        f"""
name: mem
source: {{type: memory, topic: readings, group: g1}}
decode: {{schema: 'conftest:Reading'}}
stages:
  - {{type: vectorize, fields: [x, y]}}
  - {{type: python, use: 'rtinfer_testhelpers:Double', args: {{factor: 3}}}}
model: {{path: '{model_file}'}}
sinks: [{{type: memory, topic: scored}}]
dead_letters: {{type: memory, topic: dead}}
""".replace("'conftest:Reading'", "'rtinfer_testhelpers:Reading'")
    )
    broker = Broker()
    for i in range(5):
        broker.publish("readings", payload(i, x=0.1 * i), key=b"card")
    broker.publish("readings", b"{broken", key=b"card")
    broker.end_topic("readings")
    pipeline = build_pipeline(config, broker=broker)
    assert [type(s).__name__ for s in pipeline.stages] == [
        "Decode",
        "Vectorize",
        "Double",
        "Predict",
        "Outputs",
    ]
    await asyncio.wait_for(pipeline.run(), SAFETY)
    consumer = broker.consumer(["scored", "dead"], "check")
    records = consumer.fetch_nowait(100)
    scored = [msgspec.json.decode(r.value) for r in records if r.topic == "scored"]
    dead = [msgspec.json.decode(r.value) for r in records if r.topic == "dead"]
    assert [r["id"] for r in scored] == [f"e{i}" for i in range(5)]
    assert scored[2]["probabilities"] == pytest.approx([0.4, 0.6])  # x tripled
    assert {r.key for r in records if r.topic == "scored"} == {b"card"}
    assert [d["offset"] for d in dead] == [5]
    assert broker.committed("g1", "readings") == [6]


def test_comment_lines_are_not_interpolated() -> None:
    text = "# set ${NOT_SET_ANYWHERE} to change the topic\nvalue: ${ALSO_UNSET:-7}\n"
    assert interpolate(text, {}) == "# set ${NOT_SET_ANYWHERE} to change the topic\nvalue: 7\n"


def test_a_plain_function_is_a_stage_and_a_function_with_args_a_factory() -> None:
    from rtinfer.build import _stage
    from rtinfer.config import PythonStageConfig

    built = _stage(PythonStageConfig(use="rtinfer.stages:Outputs"), 0, None)
    assert type(built).__name__ == "Outputs"  # a class is built (with no args)
    func = _stage(PythonStageConfig(use="json:dumps"), 0, None)
    assert func is json.dumps  # a function without args is the stage itself
    made = _stage(PythonStageConfig(use="functools:lru_cache", args={"maxsize": 8}), 0, None)
    assert callable(made)  # a function with args is a factory: its result is the stage
    assert made is not functools.lru_cache


def test_included_fields_must_exist_in_the_schema(tmp_path: Path, model_file: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""
source: {{type: file, path: in.jsonl}}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}"}}
decision: {{thresholds: {{block: 0.5}}, include: [x, colour]}}
sinks: [{{type: stdout}}]
"""
    )
    with pytest.raises(ConfigError, match="no field 'colour'") as info:
        load_pipeline(path)
    assert info.value.key == "decision.include"
