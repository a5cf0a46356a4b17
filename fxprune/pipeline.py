"""The pipeline runner: stages over one typed state, each declaring what it requires and provides.

A *state* is a dataclass (``fxprune.stages.CompileState`` for the compiler) whose fields are the
artefacts of a run: the user's inputs, the traced graph, the channel groups, the scores, the plan, the
pruned graph... A field no stage has written yet holds ``UNSET``. A *stage* reads the fields it names in
``requires`` and writes those it names in ``provides``; nothing else. A *pipeline* is an ordered tuple of
stages over the fields of its ``inputs``:

    Pipeline((Prepare(), Trace(), Dependency()), inputs=("model", "example_input", "options"))

The runner checks the declarations twice:

1. when the pipeline is built: every stage's ``requires`` is an input or provided by an earlier stage,
   and stage names are unique (``PipelineError`` names the stage, the missing fields and the stages
   before it);
2. when it runs: each required field is set before a stage runs and each provided field is set after
   (a stage swapped in that forgets to provide, or a state missing an input, is a ``PipelineError``).
   With ``check_reads=True`` (tests) a stage runs on a view of the state in which reading a field it does
   not declare raises, so an incomplete ``requires`` fails instead of silently working.

Each stage is timed (wall and CPU seconds, into ``state.timings`` and ``state.cpu_timings`` under its
name). An exception raised in a stage keeps its type and gets a
note (``BaseException.add_note``, shown in the traceback) naming the stage and the stages that ran
before it.

A pipeline is a value: ``replace``, ``without``, ``until``, ``insert_before`` and ``insert_after`` return
new pipelines (checked again), so a bench or a test swaps a stage or stops after one instead of importing
private helpers or monkeypatching module globals.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Generic, TypeVar

from fxprune.errors import PipelineError

__all__ = ["UNSET", "Pipeline", "PipelineState", "Stage"]


class _Unset:
    """The value of a state field no stage has provided. Any use of it (truth, attributes, calls, len,
    iteration) raises ``PipelineError``: a stage read a field it does not declare."""

    _instance: ClassVar[_Unset | None] = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise PipelineError(
            "a stage read a pipeline state field that is UNSET (no earlier stage provides it); declare it in "
            "the stage's requires and add a stage that provides it"
        )

    __bool__ = _fail
    __len__ = _fail
    __iter__ = _fail
    __call__ = _fail
    __getitem__ = _fail

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._fail()


#: a state field that has not been provided (see ``_Unset``)
UNSET: Any = _Unset()


@dataclasses.dataclass
class PipelineState:
    """Base of every pipeline state: the per-stage timings. Subclasses add the artefacts as fields with
    default ``UNSET`` (``field(default=UNSET)``)."""

    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    cpu_timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def is_set(self, name: str) -> bool:
        return getattr(self, name, UNSET) is not UNSET


S = TypeVar("S", bound=PipelineState)
#: a stage only takes its state, so a stage over a state runs over any subclass of it (contravariant):
#: ``Stage[CompileState]`` is a ``Stage[SubmoduleState]`` (``fxprune.submodules``)
S_contra = TypeVar("S_contra", bound=PipelineState, contravariant=True)


class Stage(abc.ABC, Generic[S_contra]):
    """One step of a pipeline. Subclasses set ``name``, ``requires`` and ``provides`` (field names of the
    state) and implement ``run``, which reads only ``requires`` and writes every field of ``provides``.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def run(self, state: S_contra) -> None: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}: {', '.join(self.requires)} -> {', '.join(self.provides)})"
        )


class Pipeline(Generic[S]):
    """An ordered, checked tuple of stages over the fields ``inputs`` of a state (see the module doc)."""

    def __init__(self, stages: Iterable[Stage[S]], inputs: Iterable[str]) -> None:
        self.stages: tuple[Stage[S], ...] = tuple(stages)
        self.inputs: tuple[str, ...] = tuple(inputs)
        self._check()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def provides(self) -> frozenset[str]:
        """Every field set after a run: the inputs and what each stage provides."""
        return frozenset(self.inputs).union(*(s.provides for s in self.stages))

    def _check(self) -> None:
        have = set(self.inputs)
        seen: list[str] = []
        for s in self.stages:
            if not s.name:
                raise PipelineError(f"stage {type(s).__name__} has no name")
            if s.name in seen:
                raise PipelineError(f"two stages are named {s.name!r}; stage names must be unique")
            missing = [r for r in s.requires if r not in have]
            if missing:
                raise PipelineError(
                    f"stage {s.name!r} requires {', '.join(missing)}, which no earlier stage provides "
                    f"(stages before it: {', '.join(seen) or 'none'}; inputs: {', '.join(self.inputs)}); "
                    "add a stage that provides it before this one"
                )
            have.update(s.provides)
            seen.append(s.name)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise PipelineError(
                f"no stage {name!r} in this pipeline (stages: {', '.join(self.names)})"
            ) from None

    def replace(self, name: str, stage: Stage[S]) -> Pipeline[S]:
        """The same pipeline with stage ``name`` replaced by ``stage``."""
        i = self.index(name)
        return Pipeline((*self.stages[:i], stage, *self.stages[i + 1 :]), self.inputs)

    def without(self, *names: str) -> Pipeline[S]:
        """The same pipeline without the named stages (later stages must not require what they provide)."""
        for n in names:
            self.index(n)
        return Pipeline((s for s in self.stages if s.name not in names), self.inputs)

    def until(self, name: str) -> Pipeline[S]:
        """The stages up to and including ``name``: stop after it."""
        return Pipeline(self.stages[: self.index(name) + 1], self.inputs)

    def insert_before(self, name: str, stage: Stage[S]) -> Pipeline[S]:
        i = self.index(name)
        return Pipeline((*self.stages[:i], stage, *self.stages[i:]), self.inputs)

    def insert_after(self, name: str, stage: Stage[S]) -> Pipeline[S]:
        i = self.index(name) + 1
        return Pipeline((*self.stages[:i], stage, *self.stages[i:]), self.inputs)

    def run(self, state: S, *, check_reads: bool = False) -> S:
        """Run every stage on ``state`` (changed in place and returned); see the module doc."""
        missing = [f for f in self.inputs if not state.is_set(f)]
        if missing:
            raise PipelineError(f"the pipeline's inputs {', '.join(missing)} are not set in the state")
        done: list[str] = []
        for stage in self.stages:
            missing = [f for f in stage.requires if not state.is_set(f)]
            if missing:
                raise PipelineError(
                    f"stage {stage.name!r} requires {', '.join(missing)}, which the stages before it "
                    f"({', '.join(done) or 'none'}) did not set"
                )
            key = stage.name
            t, c = time.perf_counter(), time.process_time()
            try:
                if check_reads:
                    _run_isolated(stage, state)
                else:
                    stage.run(state)
            except BaseException as exc:
                exc.add_note(
                    f"fxprune pipeline: raised in stage {stage.name!r} (after {', '.join(done) or 'no stage'})"
                )
                raise
            finally:
                state.timings[key] = state.timings.get(key, 0.0) + time.perf_counter() - t
                state.cpu_timings[key] = state.cpu_timings.get(key, 0.0) + time.process_time() - c
            unset = [f for f in stage.provides if not state.is_set(f)]
            if unset:
                raise PipelineError(
                    f"stage {stage.name!r} ({type(stage).__name__}) did not provide {', '.join(unset)}, which "
                    "it declares; a stage must set every field of its provides"
                )
            done.append(stage.name)
        return state

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(self.names)})"


def _run_isolated(stage: Stage[S], state: S) -> None:
    """Run ``stage`` on a view of ``state`` in which reading a field it does not declare raises
    ``PipelineError`` naming the field, then copy what it provides back (``check_reads=True``)."""
    declared = {*stage.requires, *stage.provides, "timings", "cpu_timings"}
    undeclared = {f.name for f in dataclasses.fields(state)} - declared

    class Guarded(type(state)):  # type: ignore[misc]
        def __getattribute__(self, name: str) -> Any:
            if name in undeclared:
                raise PipelineError(
                    f"stage {stage.name!r} ({type(stage).__name__}) read {name!r}, which it does not declare "
                    f"in requires ({', '.join(stage.requires) or 'none'})"
                )
            return super().__getattribute__(name)

    Guarded.__name__ = type(state).__name__
    view = object.__new__(Guarded)
    view.__dict__.update(state.__dict__)
    stage.run(view)
    for name in stage.provides:
        setattr(state, name, view.__dict__[name])
