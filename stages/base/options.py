"""The machinery of the stages' parameters: one field, one validated command-line option.

:class:`Option` says how a dataclass field looks on the command line;
:class:`StageParams` turns the fields of a frozen dataclass into validation,
``argparse`` options (:meth:`StageParams.add_arguments`, :meth:`StageParams.from_args`)
and an EMR step's argv (:meth:`StageParams.to_argv`).  The stages' own parameters are in
:mod:`stages.base.params`.  Nothing here imports Spark, TensorFlow or Pillow.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, Optional, Tuple

from stages.base.errors import UsageError


@dataclass(frozen=True)
class Option:
    """How one parameter looks on the command line.

    Attributes
    ----------
    flag : str
        ``--batch-size``; the dataclass field is the argparse ``dest``.
    help : str
    kind : type
        ``bool`` (a flag), ``int``, ``float`` or ``str``.
    check : callable, optional
        ``value -> None`` or the end of a sentence starting with the value, e.g.
        ``"must be at least 1"``.
    choices : tuple of str, optional
    metavar : str, optional
    group : str
        The argparse group the option is shown in.
    exclusive : str, optional
        Options sharing this name are mutually exclusive.
    """

    flag: str
    help: str
    kind: type = str
    check: Optional[Callable[[Any], Optional[str]]] = None
    choices: Optional[Tuple[str, ...]] = None
    metavar: Optional[str] = None
    group: str = "options"
    exclusive: Optional[str] = None

    def parse(self, text: str) -> Any:
        """The value of ``text`` (argparse's ``type``): converted, then checked."""
        try:
            value = self.kind(text)
        except ValueError:
            noun = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        problem = self.check(value) if self.check else None
        if problem:
            raise argparse.ArgumentTypeError(f"{text} {problem}")
        return value

    def validate(self, value: Any, default: Any = None) -> Any:
        """``value`` (from Python) as this option's kind; :class:`UsageError` when it is
        not allowed.  ``None`` is allowed only where it is the default (not given)."""
        if value is None:
            if default is None:
                return None
            raise UsageError(f"{self.flag} must not be None (default {default!r})")
        kind = self.kind
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise UsageError(f"{self.flag} {value!r} must be of type {kind.__name__}")
        value = kind(value)  # numpy's int64 or float32 become Python's
        if self.choices and value not in self.choices:
            raise UsageError(f"{self.flag} {value!r} must be one of {', '.join(self.choices)}")
        problem = self.check(value) if self.check else None
        if problem:
            raise UsageError(f"{self.flag} {value} {problem}")
        return value


def option(default: Any, **option: Any) -> Any:
    return field(default=default, metadata={"option": Option(**option)})


def at_least_1(value: float) -> Optional[str]:
    return "must be at least 1" if value < 1 else None


def not_negative(value: int) -> Optional[str]:
    return "must be 0 or more" if value < 0 else None


def share(value: float) -> Optional[str]:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1], e.g. 0.95"


def queue_url(value: str) -> Optional[str]:
    """Why ``value`` is no SQS queue URL (``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME``)."""
    if re.match(r"^https?://[^/\s]+/[^/\s]+/[^/\s]+/?$", value):
        return None
    return "must be an SQS queue URL, https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"


def positive_seconds(value: float) -> Optional[str]:
    return None if value > 0 else "must be more than 0 seconds"


def check_alpha(alpha: float) -> Optional[str]:
    """Why ``alpha`` is no MobileNetV2 width multiplier, or None."""
    return None if 0.0 < alpha <= 2.0 else "must be in (0, 2]; MobileNetV2 ships 0.35 ... 1.4"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|seconds?|m|min|minutes?|h|hours?)\s*$")


_UNIT_SECONDS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def _seconds(text: str) -> Optional[float]:
    m = _DURATION.match(text)
    if not m:
        return None
    unit = m.group(2)
    unit = unit.rstrip("s") if unit.startswith(("second", "minute", "hour")) else unit
    scale = {"second": 1, "minute": 60, "hour": 3600}.get(unit, _UNIT_SECONDS.get(unit, 1))
    return float(m.group(1)) * scale


def duration(text: str) -> Optional[str]:
    seconds = _seconds(text)
    if seconds is None:
        return "is not a duration: use e.g. 10s, 500ms, 2min"
    return "must be more than 0" if seconds <= 0 else None


def parse_duration(text: str) -> float:
    """Seconds in ``10s``, ``500ms``, ``2min``, ``1h`` or ``30 seconds``."""
    problem = duration(text)
    if problem:
        raise UsageError(f"--trigger {text!r} {problem}")
    return float(_seconds(text))  # type: ignore[arg-type]


class StageParams:
    """What the three stages' parameter dataclasses share (see the module docstring)."""

    def __post_init__(self) -> None:
        for f, option in self.options():
            value = option.validate(getattr(self, f.name), f.default)
            object.__setattr__(self, f.name, value)  # frozen: the checked, converted value
        self.cross_check()

    def cross_check(self) -> None:
        """Rules between fields; raise :class:`UsageError`."""

    @classmethod
    def options(cls) -> Iterator[Tuple[dataclasses.Field, Option]]:
        """The dataclass fields that are command-line options, in order."""
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if "option" in f.metadata:
                yield f, f.metadata["option"]

    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser,
        exclude: Collection[str] = (),
        defaults: Optional[Mapping[str, Any]] = None,
        helps: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Add the options to ``parser`` (fields in ``exclude`` left out).

        ``defaults`` and ``helps`` replace a field's default and help text (``emr
        submit`` defaults ``--weights`` to ``imagenet``).
        """
        defaults = dict(defaults or {})
        helps = dict(helps or {})
        groups: Dict[str, Any] = {}
        exclusive: Dict[str, Any] = {}
        for f, opt in cls.options():
            if f.name in exclude:
                continue
            group = groups.get(opt.group)
            if group is None:
                group = groups[opt.group] = parser.add_argument_group(opt.group)
            if opt.exclusive:
                if opt.exclusive not in exclusive:
                    exclusive[opt.exclusive] = group.add_mutually_exclusive_group()
                group = exclusive[opt.exclusive]
            default = defaults.get(f.name, f.default)
            kwargs: Dict[str, Any] = {"dest": f.name, "help": helps.get(f.name, opt.help)}
            if opt.kind is bool:
                # A flag sets the opposite of the field's default (--ignore-exif-orientation).
                kwargs["action"] = "store_false" if f.default else "store_true"
                kwargs["default"] = default
            else:
                kwargs.update(default=default, type=opt.parse, metavar=opt.metavar)
                if opt.choices:
                    kwargs.update(choices=opt.choices, type=None)
            group.add_argument(opt.flag, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **changes: Any):
        """The parameters in parsed arguments (fields absent from ``args`` keep their
        defaults); bad combinations raise :class:`UsageError`."""
        values = {f.name: getattr(args, f.name) for f, _ in cls.options() if hasattr(args, f.name)}
        values.update(changes)
        return cls(**values)  # type: ignore[call-arg]

    @classmethod
    def of(cls, params: Optional[StageParams] = None, **changes: Any):
        """``params`` (default: all defaults) with ``changes``, validated: how the Python
        API takes either a parameter object or keyword arguments."""
        if params is not None and not isinstance(params, cls):
            raise TypeError(f"expected {cls.__name__}, got {type(params).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no parameter {', '.join(unknown)}")
        base = params if params is not None else cls()
        return dataclasses.replace(base, **changes) if changes else base  # type: ignore

    def to_argv(self, exclude: Collection[str] = ()) -> List[str]:
        """The command-line arguments that give these parameters to the stage: only the
        values that differ from the defaults, so a step relies on the node's defaults."""
        argv: List[str] = []
        for f, opt in self.options():
            value = getattr(self, f.name)
            if f.name in exclude or value == f.default:
                continue
            if opt.kind is bool:
                argv.append(opt.flag)
            elif value is not None:
                argv += [opt.flag, str(value)]
        return argv
