"""Models: ONNX Runtime models, conversions from scikit-learn and LightGBM, Python models.

Also the input checks every model call goes through.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import joblib
import lightgbm
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from rtinfer.exceptions import ModelError, ModelInputError, ModelLoadError
from rtinfer.models import (
    OnnxModel,
    PythonModel,
    check_inputs,
    example_inputs,
    load_model,
    rows_of,
    tensor,
)
from rtinfer.models.convert import (
    lightgbm_to_onnx,
    load_pickle,
    n_features_of,
    sklearn_to_onnx,
    to_onnx,
)
from rtinfer.models.onnx import choose_providers
from rtinfer.types import Arrays, Model, TensorSpec

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
WEIGHTS = np.array([[1.0], [-2.0], [0.5]], dtype=np.float32)
PROBA_TOLERANCE = 1e-5


def linear_sigmoid(weights: npt.NDArray[np.float32] = WEIGHTS) -> bytes:
    """A real ONNX graph: score = sigmoid(x @ weights), x of shape [N, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["score"]),
        ],
        "linear_sigmoid",
        [x],
        [score],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def expected_score(x: npt.NDArray[np.float32], weights: npt.NDArray[np.float32] = WEIGHTS) -> Any:
    return 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ weights.astype(np.float64))))


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "scorer.onnx"
    path.write_bytes(linear_sigmoid())
    return path


@pytest.fixture(scope="module")
def dataset() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = ((x[:, 0] + 0.5 * x[:, 1] - x[:, 2] + rng.normal(scale=0.5, size=300)) > 0).astype(np.int64)
    return x, y


def loaded(model: OnnxModel) -> OnnxModel:
    model.load()
    return model


# -- ONNX Runtime models --------------------------------------------------------


def test_onnx_model_reads_its_graph_and_predicts(onnx_file: Path) -> None:
    model = OnnxModel(onnx_file)
    assert isinstance(model, Model)
    assert model.name == "scorer"
    assert model.version == "unloaded"
    model.load()
    assert model.inputs == [TensorSpec("x", F32, (None, 3))]
    assert model.outputs == [TensorSpec("score", F32, (None, 1))]
    assert "CPUExecutionProvider" in model.providers
    x = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=np.float32)
    out = model.predict({"x": x})
    assert list(out) == ["score"]
    assert out["score"].shape == (3, 1)
    np.testing.assert_allclose(out["score"], expected_score(x), rtol=1e-6)
    ran: list[int] = []
    predict = model.predict
    model.predict = lambda inputs: ran.append(len(inputs["x"])) or predict(inputs)  # type: ignore[method-assign]
    model.warmup([4, 1, 9])  # on the CPU alone, the first call is the one worth running
    assert ran == [1]
    model.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    model.warmup([1, 4, 9])  # elsewhere a first call at each shape sets it up: all run
    assert ran == [1, 1, 4, 9]


def test_onnx_model_reads_fixed_dims_and_other_dtypes(tmp_path: Path) -> None:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 2])
    doubled = helper.make_tensor_value_info("doubled", TensorProto.INT64, [None, 2])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [4])
    same = helper.make_tensor_value_info("same", TensorProto.BOOL, [4])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["ids", "ids"], ["doubled"]),
            helper.make_node("Not", ["flag"], ["same"]),
        ],
        "two",
        [ids, flag],
        [doubled, same],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "two.onnx"
    path.write_bytes(proto.SerializeToString())
    model = loaded(OnnxModel(path))
    assert model.inputs == [
        TensorSpec("ids", I64, (None, 2)),
        TensorSpec("flag", np.dtype(np.bool_), (4,)),
    ]
    assert [o.name for o in model.outputs] == ["doubled", "same"]
    out = model.predict({"ids": np.array([[1, 2]], dtype=np.int64), "flag": np.zeros(4, bool)})
    np.testing.assert_array_equal(out["doubled"], [[2, 4]])
    np.testing.assert_array_equal(out["same"], [True] * 4)


def test_onnx_version_is_a_sha_prefix_that_follows_the_file(onnx_file: Path) -> None:
    first = loaded(OnnxModel(onnx_file))
    assert first.version == hashlib.sha256(onnx_file.read_bytes()).hexdigest()[:12]
    assert loaded(OnnxModel(onnx_file)).version == first.version  # same bytes, same version

    onnx_file.write_bytes(linear_sigmoid(WEIGHTS * 2))
    second = loaded(OnnxModel(onnx_file))
    assert second.version != first.version
    assert second.version == hashlib.sha256(onnx_file.read_bytes()).hexdigest()[:12]

    # Reloading the same model object after the file changed is a new version too.
    old = first.version
    first.load()
    assert first.version == second.version != old
    x = np.ones((1, 3), dtype=np.float32)
    np.testing.assert_allclose(first.predict({"x": x})["score"], expected_score(x, WEIGHTS * 2))


def test_onnx_version_given_is_kept(onnx_file: Path) -> None:
    model = OnnxModel(onnx_file, version="2024-06-01")
    assert model.version == "2024-06-01"
    model.load()
    assert model.version == "2024-06-01"


def test_onnx_model_from_bytes_hashes_the_bytes() -> None:
    data = linear_sigmoid()
    model = loaded(OnnxModel(data, name="mem"))
    assert model.name == "mem"
    assert model.version == hashlib.sha256(data).hexdigest()[:12]
    assert "<memory>" in repr(model)


def test_missing_onnx_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        OnnxModel(path).load()
    assert str(path) in str(info.value)


def test_corrupt_onnx_file_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelLoadError, match="could not load") as info:
        OnnxModel(path).load()
    assert str(path) in str(info.value)
    assert isinstance(info.value, ModelError)


def test_onnx_thread_settings_reach_the_session(onnx_file: Path) -> None:
    model = loaded(OnnxModel(onnx_file, intra_op_threads=2, inter_op_threads=3))
    options = model._session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 3
    default = loaded(OnnxModel(onnx_file))
    assert default._session.get_session_options().intra_op_num_threads == 1


def test_onnx_explicit_providers_are_used(onnx_file: Path) -> None:
    model = loaded(OnnxModel(onnx_file, providers=["CPUExecutionProvider"]))
    assert model.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("available", "chosen"),
    [
        (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
        ([], ["CPUExecutionProvider"]),
        (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
        (
            ["CPUExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
    ],
)
def test_choose_providers_puts_cuda_first_only_when_available(
    available: list[str], chosen: list[str]
) -> None:
    assert choose_providers(available) == chosen


def test_load_model_onnx_passes_options(onnx_file: Path) -> None:
    model = load_model(onnx_file, intra_op_threads=2)
    assert isinstance(model, OnnxModel)
    assert model.name == "scorer"
    model.load()
    assert model._session.get_session_options().intra_op_num_threads == 2
    named = load_model(onnx_file, name="fraud", version="7")
    assert (named.name, named.version) == ("fraud", "7")


def test_load_model_refuses_unknown_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(ModelLoadError, match=r"'\.h5'") as info:
        load_model(path)
    assert ".onnx" in str(info.value)


# -- input checks ----------------------------------------------------------------

SPECS = [tensor("x", "float32", [None, 3]), tensor("ids", np.int64, [None])]


def good_inputs(rows: int = 2) -> Arrays:
    return {"x": np.zeros((rows, 3), np.float32), "ids": np.arange(rows, dtype=np.int64)}


def test_check_inputs_returns_the_rows() -> None:
    assert check_inputs("m", SPECS, good_inputs(5)) == 5
    assert check_inputs("m", SPECS, good_inputs(0)) == 0


def test_check_inputs_unknown_name_lists_the_inputs() -> None:
    inputs = {**good_inputs(), "X": np.zeros((2, 3), np.float32)}
    with pytest.raises(
        ModelInputError, match=r"model 'm' has no input 'X'; its inputs are \['ids', 'x'\]"
    ):
        check_inputs("m", SPECS, inputs)


def test_check_inputs_missing_input_says_what_it_expects() -> None:
    inputs = good_inputs()
    del inputs["x"]
    with pytest.raises(
        ModelInputError, match=r"input 'x' is missing; it expects float32 \[-1, 3\]"
    ):
        check_inputs("m", SPECS, inputs)


def test_check_inputs_wrong_dtype_names_both_and_a_fix_that_works() -> None:
    inputs = {**good_inputs(), "x": np.zeros((2, 3), np.float64)}
    with pytest.raises(ModelInputError, match="expects dtype float32, got float64") as info:
        check_inputs("m", SPECS, inputs)
    assert "astype" in str(info.value)
    # The suggested conversion is valid code for every dtype, strings included.
    specs = [tensor("text", np.object_, [None])]
    with pytest.raises(ModelInputError, match="expects dtype object, got <U3") as info:
        check_inputs("m", specs, {"text": np.array(["abc"])})
    fix = str(info.value).split("convert with ", 1)[1]
    converted = eval("np.array(['abc'])" + fix, {"np": np})  # noqa: S307 - our own message
    assert check_inputs("m", specs, {"text": converted}) == 1


@pytest.mark.parametrize(
    ("x", "found"),
    [
        (np.zeros((2, 4), np.float32), r"\[2, 4\]"),  # wrong trailing dimension
        (np.zeros((2,), np.float32), r"\[2\]"),  # missing a dimension
        (np.zeros((2, 3, 1), np.float32), r"\[2, 3, 1\]"),  # one too many
    ],
)
def test_check_inputs_wrong_shape_names_expected_and_found(x: Any, found: str) -> None:
    with pytest.raises(ModelInputError, match=r"input 'x' expects shape \[-1, 3\], got " + found):
        check_inputs("m", SPECS, {**good_inputs(), "x": x})


def test_check_inputs_rows_must_agree() -> None:
    inputs: Arrays = {"x": np.zeros((2, 3), np.float32), "ids": np.arange(3, dtype=np.int64)}
    with pytest.raises(ModelInputError, match="disagree on the number of rows"):
        check_inputs("m", SPECS, inputs)


def test_check_inputs_refuses_what_is_not_an_array() -> None:
    inputs: Any = {**good_inputs(), "x": [[0.0, 0.0, 0.0]]}
    with pytest.raises(ModelInputError, match=r"input 'x' expects a numpy array.*got list"):
        check_inputs("m", SPECS, inputs)


def test_model_input_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no input"):
        check_inputs("m", SPECS, {"nope": np.zeros(1)})


def test_example_inputs_and_rows_of() -> None:
    specs = [tensor("x", "float32", [None, 3, None]), tensor("n", "int32", [None])]
    example = example_inputs(specs, 4)
    assert example["x"].shape == (4, 3, 1)
    assert example["x"].dtype == F32
    assert example["n"].shape == (4,)
    assert example["n"].dtype == np.dtype(np.int32)
    assert check_inputs("m", specs, example) == 4
    assert rows_of(example) == 4
    assert rows_of({}) == 0


# -- scikit-learn ----------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator",
    [
        LogisticRegression(),
        GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0),
    ],
    ids=["logistic", "gradient-boosting"],
)
def test_sklearn_conversion_matches_predict_proba(estimator: Any, dataset: Any) -> None:
    x, y = dataset
    estimator.fit(x, y)
    model = loaded(OnnxModel(sklearn_to_onnx(estimator, 4)))
    assert model.inputs == [TensorSpec("features", F32, (None, 4))]
    assert {o.name for o in model.outputs} == {"label", "probabilities"}
    out = model.predict({"features": x})
    np.testing.assert_allclose(
        out["probabilities"], estimator.predict_proba(x), atol=PROBA_TOLERANCE
    )
    np.testing.assert_array_equal(out["label"], estimator.predict(x))


class UnknownToSkl2onnx(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """A fitted scikit-learn classifier no ONNX converter knows."""

    def fit(self, x: Any, y: Any) -> UnknownToSkl2onnx:
        self.classes_ = np.unique(y)
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, x: Any) -> Any:
        return np.zeros(len(x), dtype=np.int64)


def test_sklearn_conversion_failure_is_a_short_clear_error(dataset: Any) -> None:
    x, y = dataset
    # An estimator no converter knows: skl2onnx's own failure (HistGradientBoosting with
    # skl2onnx 1.20 and onnx 1.23) comes and goes with what the process converted before.
    estimator = UnknownToSkl2onnx().fit(x, y)
    with pytest.raises(ModelLoadError, match="cannot convert UnknownToSkl2onnx") as info:
        sklearn_to_onnx(estimator, 4)
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 500
    assert info.value.__cause__ is not None  # the converter's full error is kept


def test_n_features_of_unknown_model_is_a_load_error() -> None:
    assert n_features_of(LogisticRegression().fit(np.zeros((4, 3)), [0, 1, 0, 1])) == 3
    with pytest.raises(ModelLoadError, match="how many features object expects"):
        n_features_of(object())


@pytest.fixture(scope="module")
def logistic(dataset: Any) -> LogisticRegression:
    x, y = dataset
    return LogisticRegression().fit(x, y)


@pytest.mark.parametrize("suffix", [".pkl", ".pickle", ".joblib"])
def test_pickles_are_refused_by_default(tmp_path: Path, logistic: Any, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    joblib.dump(logistic, path)
    with pytest.raises(ModelLoadError, match="allow_pickle") as info:
        load_model(path)
    assert "arbitrary code" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".pkl", ".joblib", ".JOBLIB"])
def test_pickles_served_through_onnx_when_allowed(
    tmp_path: Path, logistic: Any, dataset: Any, suffix: str
) -> None:
    x, _ = dataset
    path = tmp_path / f"fraud{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(logistic))
    else:
        joblib.dump(logistic, path)
    model = load_model(path, allow_pickle=True)
    assert type(model) is OnnxModel
    assert model.name == "fraud"
    model.load()
    out = model.predict({"features": x})
    np.testing.assert_allclose(
        out["probabilities"], logistic.predict_proba(x), atol=PROBA_TOLERANCE
    )


def test_pickle_version_follows_the_file(tmp_path: Path, dataset: Any) -> None:
    x, y = dataset
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(LogisticRegression().fit(x, y)))
    first = load_model(path, allow_pickle=True).version
    assert first == load_model(path, allow_pickle=True).version
    path.write_bytes(pickle.dumps(LogisticRegression(C=0.01).fit(x, y)))
    assert load_model(path, allow_pickle=True).version != first
    assert load_model(path, allow_pickle=True, version="v3").version == "v3"


def test_missing_pickle_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "gone.pkl", allow_pickle=True)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pickle(tmp_path / "gone.joblib", allow_pickle=True)


# -- LightGBM ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lgbm(dataset: Any) -> lightgbm.LGBMClassifier:
    x, y = dataset
    return lightgbm.LGBMClassifier(n_estimators=15, num_leaves=7, verbose=-1).fit(x, y)


def check_lightgbm_model(model: OnnxModel, lgbm: Any, x: Any) -> None:
    model.load()
    assert model.inputs == [TensorSpec("features", F32, (None, 4))]
    # Every output has one row per input row, whatever the batch size.
    assert all(o.shape[0] is None for o in model.outputs), model.outputs
    out = model.predict({"features": x})
    np.testing.assert_allclose(out["probabilities"], lgbm.predict_proba(x), atol=PROBA_TOLERANCE)
    assert out["label"].shape == (len(x),)


def test_lightgbm_conversion_matches_predict_proba(lgbm: Any, dataset: Any) -> None:
    x, _ = dataset
    check_lightgbm_model(OnnxModel(lightgbm_to_onnx(lgbm, 4)), lgbm, x)
    check_lightgbm_model(OnnxModel(to_onnx(lgbm, 4)), lgbm, x)


def test_lightgbm_pickle_served_through_onnx(tmp_path: Path, lgbm: Any, dataset: Any) -> None:
    x, _ = dataset
    path = tmp_path / "lgbm.pkl"
    path.write_bytes(pickle.dumps(lgbm))
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_model(path)
    model = load_model(path, allow_pickle=True)
    assert type(model) is OnnxModel
    check_lightgbm_model(model, lgbm, x)


def test_lightgbm_booster_text_file(tmp_path: Path, lgbm: Any, dataset: Any) -> None:
    x, _ = dataset
    path = tmp_path / "booster.txt"
    lgbm.booster_.save_model(str(path))
    model = load_model(path)
    assert type(model) is OnnxModel
    assert model.name == "booster"
    check_lightgbm_model(model, lgbm, x)


def test_lightgbm_text_file_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "gone.txt")
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a model\n")
    with pytest.raises(ModelLoadError, match="LightGBM") as info:
        load_model(path)
    assert str(path) in str(info.value)


# -- Python models ---------------------------------------------------------------


def test_python_model_learns_its_outputs_on_load() -> None:
    calls: list[int] = []

    def score(inputs: Arrays) -> Arrays:
        x = inputs["x"]
        calls.append(len(x))
        return {"total": x.sum(axis=1), "rounded": np.rint(x).astype(np.int64)}

    model = PythonModel(score, inputs={"x": ("float32", [None, 3])})
    assert isinstance(model, Model)
    assert model.name == "score"
    assert model.version == "1"
    assert model.inputs == [TensorSpec("x", F32, (None, 3))]
    assert model.outputs == []
    model.load()
    assert model.outputs == [
        TensorSpec("total", F32, (None,)),
        TensorSpec("rounded", I64, (None, 3)),
    ]
    model.warmup([1, 2, 8])
    assert calls == [1, 1, 2, 8]
    out = model.predict({"x": np.array([[1.4, 2.0, -0.6]], np.float32)})
    np.testing.assert_allclose(out["total"], [2.8], rtol=1e-6)
    np.testing.assert_array_equal(out["rounded"], [[1, 2, -1]])


def test_python_model_single_array_is_named_output() -> None:
    model = PythonModel(lambda inputs: inputs["x"] * 2, inputs=[tensor("x", "int64", [None])])
    model.load()
    assert model.outputs == [TensorSpec("output", I64, (None,))]
    np.testing.assert_array_equal(model.predict({"x": np.array([3], np.int64)})["output"], [6])


def test_python_model_declared_outputs_skip_the_probe_call() -> None:
    calls: list[int] = []

    def fn(inputs: Arrays) -> Arrays:
        calls.append(1)
        return {"y": inputs["x"]}

    declared = [tensor("y", "float32", [None])]
    model = PythonModel(
        fn, inputs={"x": ("float32", [None])}, outputs=declared, name="m", version="9"
    )
    model.load()
    assert calls == []
    assert model.outputs == declared
    assert (model.name, model.version) == ("m", "9")


@pytest.mark.parametrize("returned", [[1.0, 2.0], 3.0, None, (np.zeros(1),)])
def test_python_model_wrong_return_type_says_what_to_return(returned: Any) -> None:
    model = PythonModel(lambda inputs: returned, inputs={"x": ("float32", [None])}, name="bad")
    with pytest.raises(
        TypeError, match=r"Python model 'bad' returned .*return a numpy array or a dict"
    ):
        model.load()


def test_python_model_dict_of_non_arrays_says_which_output() -> None:
    def fn(inputs: Arrays) -> Any:
        return {"y": inputs["x"], "z": [0.0]}

    model = PythonModel(fn, inputs={"x": ("float32", [None])}, name="bad")
    with pytest.raises(TypeError, match=r"Python model 'bad' output 'z' is a list"):
        model.load()


def test_python_model_needs_a_callable_and_inputs() -> None:
    bad: Any = "not callable"
    with pytest.raises(ModelLoadError, match="needs a callable, got str"):
        PythonModel(bad, inputs={"x": ("float32", [None])})
    with pytest.raises(ModelLoadError, match="declares no inputs"):
        PythonModel(lambda inputs: inputs["x"], inputs={})
