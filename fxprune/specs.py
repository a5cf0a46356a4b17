"""Model specs and data sets for the command line.

A SPEC names a model builder:

- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``, input ``1x3x224x224``;
- ``models_zoo:NAME``: a digits CNN (``resnet20``, ``mobilenetv2``, ``densenet``; input ``1x3x32x32``) or a
  toy net (``residual``, ``concat``, ...; input ``1x3x16x16``) from ``fxprune.models_zoo``;
- ``path/to/file.py:factory``: ``factory()`` from that file, returning a module or ``(module, example_input)``.

Data (``--data``): ``digits`` (scikit-learn's digits at 32x32, ``fxprune.models_zoo.digits``) or a ``.npz``
with ``x_train``/``x_test`` (+ ``y_train``/``y_test``) or just ``x`` (+ ``y``; the last quarter is held out).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxprune.data import cache_dir as data_cache_dir
from fxprune.errors import InputError

__all__ = ["Dataset", "ModelSpec", "SpecError", "cache_dir", "load_data", "load_spec"]

SPEC_HELP = "SPEC is torchvision:NAME, models_zoo:NAME or path/to/file.py:factory"


class SpecError(InputError):
    """A model spec, data argument or file given on the command line cannot be used (names the fix)."""


@dataclass
class ModelSpec:
    """A built model, the example input it takes and a stable key for caching its trained weights."""

    spec: str
    model: torch.nn.Module
    example_input: tuple[torch.Tensor, ...]
    key: str


@dataclass(frozen=True)
class Dataset:
    """Calibration/training split and evaluation split; targets may be absent."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None

    @property
    def classification(self) -> bool:
        return self.y_test is not None and not torch.is_floating_point(self.y_test)


def _shape(s: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if s is None:
        return default
    try:
        shape = tuple(int(v) for v in s.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise SpecError(f"--input-shape {s!r} is not a list of integers; write e.g. 1,3,224,224") from None
    if not shape or any(v <= 0 for v in shape):
        raise SpecError(f"--input-shape {s!r} must be positive integers, e.g. 1,3,224,224")
    return shape


def _closest(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=3)
    return (
        f"; did you mean {', '.join(near)}?"
        if near
        else f"; choose one of {', '.join(sorted(choices)[:12])} ..."
    )


def _torchvision(name: str, input_shape: str | None) -> ModelSpec:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise SpecError(f"torchvision has no classification model {name!r}{_closest(name, names)}")
    model = torchvision.models.get_model(name, weights=None)
    side = 299 if name == "inception_v3" else 224
    if name == "inception_v3":
        model.aux_logits, model.AuxLogits = False, None  # type: ignore[assignment]
    shape = _shape(input_shape, (1, 3, side, side))
    return ModelSpec(f"torchvision:{name}", model, (torch.randn(shape),), f"torchvision-{name}")


def _models_zoo(name: str, input_shape: str | None) -> ModelSpec:
    from fxprune.models_zoo.digits import DIGITS_MODELS
    from fxprune.models_zoo.toy import TOY_MODELS

    if name in DIGITS_MODELS:
        model, shape = DIGITS_MODELS[name](), (1, 3, 32, 32)
    elif name in TOY_MODELS:
        model, shape = TOY_MODELS[name](), (1, 3, 16, 16)
    else:
        raise SpecError(f"models_zoo has no model {name!r}{_closest(name, [*DIGITS_MODELS, *TOY_MODELS])}")
    return ModelSpec(f"models_zoo:{name}", model, (torch.randn(_shape(input_shape, shape)),), f"zoo-{name}")


def _from_file(path_s: str, factory: str, input_shape: str | None, need_example: bool) -> ModelSpec:
    path = Path(path_s)
    if not path.is_file():
        raise SpecError(f"model file '{path}' not found; {SPEC_HELP}")
    if not factory.isidentifier():
        raise SpecError(f"'{factory}' is not a Python name; write {path}:my_factory")
    mod_name = "fxprune_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise SpecError(f"cannot import '{path}' as Python; it must be a .py file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        raise SpecError(f"importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise SpecError(f"'{path}' defines no callable '{factory}'{_closest(factory, found)}")
    try:
        built = fn()
    except Exception as exc:
        raise SpecError(f"{path}:{factory}() raised {type(exc).__name__}: {exc}") from exc
    example: Any = None
    if isinstance(built, tuple) and len(built) == 2:
        built, example = built
    if not isinstance(built, torch.nn.Module):
        raise SpecError(
            f"{path}:{factory}() returned {type(built).__name__}; return an nn.Module or (module, example_input)"
        )
    if example is None and input_shape is None and not need_example:
        example = ()
    elif example is None:
        if input_shape is None:
            raise SpecError(
                f"{path}:{factory}() returned no example input; return (module, example) or pass --input-shape"
            )
        example = torch.randn(_shape(input_shape, ()))
    elif input_shape is not None:
        example = torch.randn(_shape(input_shape, ()))
    ex = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    digest = hashlib.sha1(path.read_bytes() + factory.encode()).hexdigest()[:12]
    return ModelSpec(f"{path}:{factory}", built, ex, f"file-{path.stem}-{factory}-{digest}")


def load_spec(spec: str, input_shape: str | None = None, need_example: bool = True) -> ModelSpec:
    """Build the model a SPEC names (see the module docstring); ``SpecError`` says what is wrong.

    With ``need_example=False`` a file factory may return a bare module (the data supplies the input).
    """
    kind, sep, name = spec.rpartition(":")
    if not sep or not kind or not name:
        raise SpecError(f"bad SPEC {spec!r}: {SPEC_HELP}")
    if kind == "torchvision":
        return _torchvision(name, input_shape)
    if kind in ("models_zoo", "fxprune.models_zoo"):
        return _models_zoo(name, input_shape)
    if kind.endswith(".py"):
        return _from_file(kind, name, input_shape, need_example)
    raise SpecError(f"bad SPEC {spec!r}: unknown source '{kind}'; {SPEC_HELP}")


def _tensor(a: Any, what: str, path: Path) -> torch.Tensor:
    t = torch.as_tensor(a)
    if t.dtype == torch.float64:
        t = t.float()
    if t.dtype not in (torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool):
        raise SpecError(f"array '{what}' in '{path}' has dtype {t.dtype}; use float32 inputs, int64 labels")
    return t.long() if what.startswith("y") and not torch.is_floating_point(t) else t


def load_data(arg: str) -> Dataset:
    """``digits`` or a .npz file (see the module docstring)."""
    if arg == "digits":
        try:
            from fxprune.models_zoo.digits import load_digits_32

            d = load_digits_32()
        except ImportError as exc:
            raise SpecError(
                f"--data digits needs scikit-learn ({exc}); install it with pip install scikit-learn"
            ) from exc
        return Dataset("digits", d.x_train, d.y_train, d.x_test, d.y_test)
    path = Path(arg)
    if path.suffix != ".npz":
        raise SpecError(f"--data {arg!r}: give 'digits' or a .npz file with arrays x_train/x_test or x")
    if not path.is_file():
        raise SpecError(f"data file '{path}' not found")
    import numpy as np

    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise SpecError(f"cannot read '{path}' as .npz: {type(exc).__name__}: {exc}") from exc
    if "x_train" in arrays and "x_test" in arrays:
        xs = {
            k: _tensor(v, k, path)
            for k, v in arrays.items()
            if k in ("x_train", "y_train", "x_test", "y_test")
        }
        return Dataset(path.name, xs["x_train"], xs.get("y_train"), xs["x_test"], xs.get("y_test"))
    if "x" in arrays:
        x = _tensor(arrays["x"], "x", path)
        y = _tensor(arrays["y"], "y", path) if "y" in arrays else None
        cut = max(1, len(x) - max(1, len(x) // 4))
        return Dataset(
            path.name, x[:cut], None if y is None else y[:cut], x[cut:], None if y is None else y[cut:]
        )
    raise SpecError(
        f"'{path}' has arrays {sorted(arrays)}; it needs x_train and x_test, or x (labels y optional)"
    )


def cache_dir() -> Path:
    """Where trained weights are cached: ``fxprune.data.cache_dir()`` (``$FXPRUNE_CACHE`` or
    ``~/.cache/fxprune``)."""
    return data_cache_dir()
