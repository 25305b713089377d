"""One definition per stage's parameters: the CLI, the Python API and `emr submit` agree."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.base.errors import UsageError
from stages.base.params import FeaturizeParams, ReduceParams, StageParams, WatchParams
from stages.cli import build_parser

CLASSES = (FeaturizeParams, ReduceParams, WatchParams)


def _parser(cls, **kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    cls.add_arguments(p, **kwargs)
    return p


def _valid(cls) -> st.SearchStrategy:
    """Any valid parameters of ``cls`` (each field from its own option's rules)."""
    values = {
        "weights": st.sampled_from(["bundled", "imagenet", "random:7", "/w/my weights.h5"]),
        "alpha": st.none() | st.sampled_from([0.35, 0.5, 1.0, 1.4]),
        "engine": st.sampled_from([None, "litert", "keras"]),
        "jpeg_draft": st.integers(0, 8),
        "batch_size": st.none() | st.integers(1, 512),
        "partitions": st.none() | st.integers(1, 10_000),
        "max_files_per_trigger": st.none() | st.integers(1, 10_000),
        "k": st.none() | st.integers(1, 1280),
        "variance": st.none() | st.floats(0.01, 1.0),
        "check": st.sampled_from([None, "spark-ml"]),
        "trigger": st.none() | st.sampled_from(["10s", "500ms", "2min", "1h"]),
        "checkpoint": st.none() | st.just("s3://b/ck"),
        "results": st.none() | st.just("s3://b/Results"),
        "stop_after": st.none() | st.floats(0.5, 1e5),
        "queue": st.none() | st.just("https://sqs.eu-west-3.amazonaws.com/123456789012/q"),
    }
    fields = {}
    for f, opt in cls.options():
        fields[f.name] = st.booleans() if opt.kind is bool else values[f.name]

    def build(kw):
        try:
            return cls(**kw)
        except UsageError:  # a combination the stage refuses (e.g. --k with --variance)
            return None

    return st.fixed_dictionaries(fields).map(build).filter(lambda p: p is not None)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_parser_defaults_are_the_dataclass_defaults(cls):
    assert cls.from_args(_parser(cls).parse_args([])) == cls()
    assert cls().to_argv() == []


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_to_argv_parses_back_to_the_same_parameters(cls, data):
    params = data.draw(_valid(cls))
    argv = params.to_argv()
    assert cls.from_args(_parser(cls).parse_args(argv)) == params
    # Only what differs from the defaults is spelled out: the node's defaults are the same.
    defaults = cls()
    changed = [
        f.name for f, _ in cls.options() if getattr(params, f.name) != getattr(defaults, f.name)
    ]
    flags = {opt.flag: f.name for f, opt in cls.options()}
    assert sorted(flags[a] for a in argv if a in flags) == sorted(changed)


@pytest.mark.parametrize(
    "cls, kwargs, argv, message",
    [
        (FeaturizeParams, {"batch_size": 0}, ["--batch-size", "0"], "0 must be at least 1"),
        (FeaturizeParams, {"partitions": -2}, ["--partitions", "-2"], "-2 must be at least 1"),
        (FeaturizeParams, {"jpeg_draft": -1}, ["--jpeg-draft", "-1"], "-1 must be 0 or more"),
        (FeaturizeParams, {"alpha": 3.0}, ["--alpha", "3.0"], r"3.0 must be in \(0, 2\]"),
        (ReduceParams, {"k": 0}, ["--k", "0"], "0 must be at least 1"),
        (ReduceParams, {"variance": 1.5}, ["--variance", "1.5"], r"1.5 must be in \(0, 1\]"),
        (WatchParams, {"stop_after": 0.0}, ["--stop-after", "0"], "must be more than 0 seconds"),
        (WatchParams, {"trigger": "soon"}, ["--trigger", "soon"], "soon is not a duration"),
        (
            WatchParams,
            {"max_files_per_trigger": 0},
            ["--max-files-per-trigger", "0"],
            "0 must be at least 1",
        ),
    ],
)
def test_python_and_the_command_line_refuse_a_value_with_the_same_reason(
    cls, kwargs, argv, message
):
    with pytest.raises(UsageError, match=message) as python:
        cls(**kwargs)
    assert str(python.value).startswith(argv[0])  # names the option the user would type
    with pytest.raises(argparse.ArgumentError, match=message):
        _parser(cls).parse_args(argv)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (FeaturizeParams, {"prune": True}, "--prune only works with --incremental"),
        (FeaturizeParams, {"incremental": True, "overwrite": True}, "drop --overwrite"),
        (ReduceParams, {"k": 3, "variance": 0.9}, "give --k or --variance, not both"),
        (ReduceParams, {"update": True, "overwrite": True}, "drop --overwrite"),
        (WatchParams, {"trigger": "5s", "available_now": True}, "--trigger or --available-now"),
        (FeaturizeParams, {"batch_size": "8"}, "--batch-size '8' must be of type int"),
        (FeaturizeParams, {"exif_orientation": 1}, "must be of type bool"),
        (FeaturizeParams, {"engine": "onnx"}, "must be one of litert, keras"),
    ],
)
def test_options_that_do_not_go_together_or_wrong_types_are_refused(cls, kwargs, message):
    with pytest.raises(UsageError, match=message):
        cls(**kwargs)


def test_of_takes_an_object_or_keywords_and_validates_the_result():
    base = FeaturizeParams(weights="random:1", batch_size=4)
    assert FeaturizeParams.of(base) is base
    assert FeaturizeParams.of(base, batch_size=16) == dataclasses.replace(base, batch_size=16)
    assert FeaturizeParams.of(alpha=1) == FeaturizeParams(alpha=1)  # an int is a float here
    with pytest.raises(UsageError, match="--batch-size 0 must be at least 1"):
        FeaturizeParams.of(base, batch_size=0)
    with pytest.raises(TypeError, match="FeaturizeParams has no parameter colour"):
        FeaturizeParams.of(colour="red")
    with pytest.raises(TypeError, match="expected ReduceParams, got FeaturizeParams"):
        ReduceParams.of(base)


def test_derived_values():
    assert ReduceParams().target_variance == 0.95
    assert ReduceParams(k=4).target_variance is None
    assert ReduceParams(variance=0.8).target_variance == 0.8
    assert WatchParams().trigger_seconds == 10.0
    assert WatchParams(trigger="2min").trigger_seconds == 120.0
    assert WatchParams(available_now=True).trigger_seconds is None


def _subparser(argv_head):
    """The argparse parser behind ``fruits-pipeline <argv_head...>``."""
    parser = build_parser()
    for word in argv_head:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize(
    "head, cls",
    [
        (["featurize"], FeaturizeParams),
        (["reduce"], ReduceParams),
        (["watch"], WatchParams),
        (["emr", "submit", "featurize"], FeaturizeParams),
        (["emr", "submit", "reduce"], ReduceParams),
        (["emr", "submit", "watch"], WatchParams),
    ],
)
def test_every_command_of_a_stage_offers_exactly_its_parameters(head, cls):
    flags = {o for a in _subparser(head)._actions for o in a.option_strings}
    wanted = {opt.flag for _, opt in cls.options()}
    assert wanted <= flags
    # Nothing that looks like a stage option but is not one of the dataclass's.
    others = {"--help", "-h", "--quiet", "-v", "--verbose", "--debug", "--master", "--conf"}
    others |= {"--region", "--no-wait"}
    assert flags - wanted <= others


def test_run_takes_featurize_and_reduce_options_with_one_overwrite():
    flags = {o for a in _subparser(["run"])._actions for o in a.option_strings}
    assert {"--weights", "--jpeg-draft", "--k", "--variance", "--check", "--overwrite"} <= flags
    assert not flags & {"--incremental", "--prune", "--update"}


def test_every_parameter_class_is_a_frozen_dataclass_of_options():
    for cls in CLASSES:
        assert issubclass(cls, StageParams)
        with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign"):
            cls().overwrite = True  # type: ignore[misc]


@pytest.mark.parametrize(
    "cls, field, default",
    [
        (FeaturizeParams, "weights", "bundled"),
        (FeaturizeParams, "jpeg_draft", 0),
        (FeaturizeParams, "overwrite", False),
        (FeaturizeParams, "exif_orientation", True),
        (ReduceParams, "update", False),
        (WatchParams, "available_now", False),
    ],
)
def test_none_is_refused_where_the_default_is_a_value(cls, field, default):
    # Else `overwrite=None` would be falsy here but `--overwrite` on an EMR step.
    with pytest.raises(UsageError, match=rf"must not be None \(default {default!r}\)"):
        cls(**{field: None})


def test_numpy_numbers_are_taken_as_python_ones():
    import numpy as np

    params = ReduceParams(k=np.int64(3))
    assert params.k == 3 and type(params.k) is int
    assert params.to_argv() == ["--k", "3"]
    assert type(WatchParams(stop_after=np.float32(2.5)).stop_after) is float
    with pytest.raises(UsageError, match="--k True must be of type int"):
        ReduceParams(k=True)


@pytest.mark.parametrize(
    "text, reason",
    [("0s", "must be more than 0"), ("soon", "is not a duration"), ("-1s", "is not a duration")],
)
def test_a_bad_trigger_says_why(text, reason):
    with pytest.raises(UsageError, match=f"--trigger {text} {reason}"):
        WatchParams(trigger=text)
    with pytest.raises(argparse.ArgumentError, match=f"{text} {reason}"):
        _parser(WatchParams).parse_args([f"--trigger={text}"])
