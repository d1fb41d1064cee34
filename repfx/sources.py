"""Where a model to fold comes from: the ``SOURCE`` of ``repfx optimize SOURCE``.

``load_source(source, arch=None, weights=None, trust_pickle=False)`` returns a
:class:`LoadedModel`. ``source`` is one of

- a built-in model name from :mod:`repfx.models` (``riformer_s12``);
- ``timm:NAME`` — ``timm.create_model(NAME)`` with random weights (timm must be installed);
- ``package.module:factory`` — the user's own code: the module is imported and ``factory``
  called without arguments, with the current directory importable meanwhile (as with
  ``python -m``; ``sys.path`` is restored afterwards); an ``nn.Module`` instance attribute is
  used as it is;
- a file: a state dict (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` read with
  ``torch.load(weights_only=True)``, or ``.safetensors``) loaded into the model named by
  ``arch`` (any of the three spellings above); or a whole pickled module (``torch.save(model)``),
  which is loaded only with ``trust_pickle=True`` because unpickling runs code from the file.

``weights`` (a state-dict file) may accompany a model spelled by name, timm or factory, and is
the same as ``load_source(weights, arch=source)``.

Every failure raises a :class:`SourceError` subclass whose message is one line saying what is
wrong and what to do; ``repfx.cli`` maps the classes to exit codes.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import pickle
import pickletools
import re
import sys
import types
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import models
from .errors import Error, one_line

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)  # the built-in models are ImageNet classifiers
# Keys under which training checkpoints commonly keep the model's state dict.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema")


class SourceError(Error):
    """The model could not be loaded; the message says why and what to do."""


class SourceUsageError(SourceError):
    """SOURCE and ``arch`` / ``weights`` do not go together (e.g. a state dict without arch)."""


class SourceNotFoundError(SourceError):
    """SOURCE (or ``--weights``) names a file that does not exist."""


class UnreadableSourceError(SourceError):
    """The file exists but cannot be read as a model or state dict (corrupt, wrong kind, or
    its weights do not fit the architecture)."""


class UnknownModelError(SourceError):
    """A built-in or timm model name that does not exist."""


class UntrustedPickleError(SourceError):
    """The file is a pickle of Python objects, and loading it was not explicitly allowed."""


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "builtin", "timm", "factory", "state_dict" or "pickle"
    description: str  # e.g. "riformer_tiny", "timm:resnet18", "weights.pt into riformer_tiny"
    default_input_shape: tuple[int, ...] | None = None
    files: list[Path] = field(default_factory=list)  # files read (never to be overwritten)


def is_file_source(source: str) -> bool:
    """Does ``source`` name a file (rather than a model name, ``timm:`` or ``module:factory``)?"""
    if source.startswith("timm:"):
        return False
    return (
        os.path.exists(source)
        or source.lower().endswith(STATE_DICT_SUFFIXES)
        or os.sep in source
        or "/" in source
    )


def load_source(
    source: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Build or load the model ``source`` names (see the module docstring)."""
    if is_file_source(source):
        if weights is not None:
            raise SourceUsageError(
                f"--weights is for a model given by name; {source} is already a file "
                "(pass the architecture with --arch instead)"
            )
        return _load_file(Path(source), arch, trust_pickle)
    if arch is not None:
        raise SourceUsageError(
            f"--arch names the model that a state-dict file is loaded into; {source!r} is "
            "already a model (use --weights FILE to give it weights)"
        )
    loaded = build_model(source)
    if weights is not None:
        path = Path(weights)
        state = read_state_dict(path, trust_pickle)
        if isinstance(state, nn.Module):
            raise SourceUsageError(
                f"--weights {weights} holds a whole model, not a state dict; pass it as SOURCE "
                "instead"
            )
        load_weights(loaded.model, state, path, source)
        loaded.description = f"{source} with weights {weights}"
        loaded.files.append(path)
    return loaded


def build_model(spec: str) -> LoadedModel:
    """A freshly initialised model from a built-in name, ``timm:NAME`` or ``module:factory``."""
    if spec.startswith("timm:"):
        return _build_timm(spec[len("timm:") :])
    if ":" in spec:
        return _build_factory(spec)
    try:
        model = models.create(spec)
    except KeyError as exc:
        raise UnknownModelError(
            f"{exc.args[0]}. Use timm:NAME for a timm model, package.module:factory for "
            "your own code, or a file path"
        ) from None
    return LoadedModel(model, "builtin", spec, DEFAULT_IMAGE_SHAPE)


def _build_timm(name: str) -> LoadedModel:
    try:
        import timm
    except ImportError:
        raise SourceError(f"timm:{name} needs timm; install it with `pip install timm`") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UnknownModelError(
            f"unknown timm model {name!r}{hint} (`python -c 'import timm; "
            "print(timm.list_models())'` lists them)"
        )
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise SourceError(f"timm could not build {name!r}: {one_line(exc)}") from exc
    return LoadedModel(model, "timm", f"timm:{name}", _shape_from_cfg(model))


def _build_factory(spec: str) -> LoadedModel:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise SourceUsageError(f"{spec!r}: expected package.module:factory")
    with _current_directory_importable():  # for the import and the call (lazy imports)
        module = _import_factory_module(module_name, spec)
        obj = _factory_attribute(module, module_name, attr_path)
        model = obj if isinstance(obj, nn.Module) else _call_factory(obj, spec)
    return LoadedModel(model, "factory", spec, _shape_from_cfg(model))


@contextlib.contextmanager
def _current_directory_importable() -> Iterator[None]:
    """Within the block the current directory is importable, as with ``python -m`` (the
    user's own modules import); afterwards ``sys.path`` no longer holds the entry added."""
    cwd = os.getcwd()
    if "" in sys.path or cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the imported code removed it itself
            sys.path.remove(cwd)


def _import_factory_module(module_name: str, spec: str) -> types.ModuleType:
    """The module of a ``module:factory`` spec; an import failure becomes a
    :class:`SourceError`."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SourceError(
                f"cannot import {module_name!r} (from {spec!r}): no such module; run repfx "
                "from the directory that contains it or add it to PYTHONPATH"
            ) from None
        raise SourceError(f"importing {module_name!r} failed: {one_line(exc)}") from exc
    except (Exception, SystemExit) as exc:  # sys.exit() at import time is a failure too
        raise SourceError(f"importing {module_name!r} failed: {one_line(exc)}") from exc


def _factory_attribute(module: types.ModuleType, module_name: str, attr_path: str) -> object:
    """``module.<attr_path>`` (a dotted path), or a :class:`SourceError` naming what is missing."""
    obj: object = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SourceError(f"{module_name!r} has no attribute {attr_path!r}") from None
    return obj


def _call_factory(factory: object, spec: str) -> nn.Module:
    """The model ``factory()`` returns; a :class:`SourceError` when ``factory`` is not
    callable, fails, exits or returns something other than an ``nn.Module``."""
    if not callable(factory):
        raise SourceError(f"{spec} is a {type(factory).__name__}, not a model factory")
    try:
        model = factory()
    except SystemExit as exc:  # sys.exit() in the factory: it built no model
        raise SourceError(
            f"{spec}() exited (SystemExit({exc.code!r})) instead of returning a model"
        ) from exc
    except Exception as exc:
        raise SourceError(f"{spec}() raised {one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise SourceError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _shape_from_cfg(model: nn.Module) -> tuple[int, ...] | None:
    """The input size timm models carry in ``pretrained_cfg`` / ``default_cfg``, batch 1."""
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, name, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if size and all(isinstance(d, int) and d > 0 for d in size):
            return (1, *size)
    return None


def _load_file(path: Path, arch: str | None, trust_pickle: bool) -> LoadedModel:
    content = read_state_dict(path, trust_pickle)
    if isinstance(content, nn.Module):
        if arch is not None:
            raise SourceUsageError(f"{path} holds a whole model; --arch is only for state dicts")
        return LoadedModel(content, "pickle", str(path), _shape_from_cfg(content), [path])
    if arch is None:
        raise SourceUsageError(
            f"{path} holds a state dict (weights only); pass --arch with the model to load "
            "it into (a built-in name, timm:NAME or package.module:factory)"
        )
    loaded = build_model(arch)
    load_weights(loaded.model, content, path, arch)
    return LoadedModel(
        loaded.model, "state_dict", f"{path} into {arch}", loaded.default_input_shape, [path]
    )


def read_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """A file's state dict — or, only with ``trust_pickle``, the module pickled in it."""
    if not path.exists():
        raise SourceNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise UnreadableSourceError(f"{path} is a directory, not a model file")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch's note on a raw pickle's protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        referenced = _referenced_global(exc, path)
        if referenced is None:  # not a pickle of objects: damaged, or not a model file at all
            raise UnreadableSourceError(
                f"cannot read {path}: not a PyTorch file or it is corrupt"
            ) from exc
        if not trust_pickle:
            what = f" (it references {referenced})" if referenced else ""
            raise UntrustedPickleError(
                f"{path} contains pickled Python objects, not just tensors{what}; unpickling "
                "it would run arbitrary code from the file, so repfx refuses. Save a state "
                "dict instead (torch.save(model.state_dict(), path)) and pass --arch, or, if "
                "you created the file or trust who did, pass --trust-pickle"
            ) from None
        content = _load_trusted_pickle(path)
    except OSError as exc:
        raise UnreadableSourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        raise UnreadableSourceError(
            f"cannot read {path}: not a PyTorch file or it is corrupt ({one_line(exc)})"
        ) from exc
    return _as_state_dict_or_module(content, path)


def _referenced_global(exc: pickle.UnpicklingError, path: Path) -> str | None:
    """The global (class or function) that made the weights-only unpickler stop, or ``None``
    if the file holds no such global (it is damaged or not a PyTorch file at all).

    The unpickler's message names it in most cases (``Unsupported global: GLOBAL mod.Cls``,
    ``unsupported GLOBAL posix.system whose module posix is blocked``); otherwise the file's
    pickle is disassembled, which executes nothing: torch's zip format with
    :func:`torch.serialization.get_unsafe_globals_in_checkpoint`, a bare pickle with
    ``pickletools``."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return found.group(1)
    return _unsafe_zip_global(path) or _pickled_global(path)


def _unsafe_zip_global(path: Path) -> str | None:
    """The first global of a ``torch.save`` zip file that the weights-only unpickler does not
    allow, found by disassembling its ``data.pkl``; ``None`` for any other file."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None
    return sorted(unsafe)[0] if unsafe else None


def _pickled_global(path: Path) -> str | None:
    """The first global a plain pickle file references, read with ``pickletools`` (which
    parses opcodes and executes nothing); ``None`` if the file is not such a pickle."""
    strings: list[str] = []
    try:
        with path.open("rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:]) if len(strings) >= 2 else ""
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:
        return None
    return None


def _load_trusted_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UnreadableSourceError(
            f"cannot unpickle {path}: {one_line(exc)} (are the model's classes importable?)"
        ) from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SourceError(
            f"{path} is a safetensors file; install safetensors (`pip install safetensors`)"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise UnreadableSourceError(
            f"cannot read {path}: not a safetensors file or it is corrupt ({one_line(exc)})"
        ) from exc


def _as_state_dict_or_module(content: object, path: Path) -> dict[str, torch.Tensor] | nn.Module:
    if isinstance(content, nn.Module):
        return content
    if isinstance(content, Mapping) and not _is_state_dict(content):
        for key in _CHECKPOINT_KEYS:  # a training checkpoint: {"state_dict": ..., "epoch": 3}
            inner = content.get(key)
            if isinstance(inner, nn.Module) or (
                isinstance(inner, Mapping) and _is_state_dict(inner)
            ):
                return inner if isinstance(inner, nn.Module) else dict(inner)
    if isinstance(content, Mapping) and _is_state_dict(content):
        return dict(content)
    raise UnreadableSourceError(
        f"{path} holds a {type(content).__name__}, not a model or a state dict of tensors"
    )


def _is_state_dict(content: Mapping) -> bool:
    return bool(content) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()
    )


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str
) -> None:
    """``model.load_state_dict(state)``, strict, with a one-line error when they do not fit."""
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label} {_first(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        )
        if items
    ]
    if problems:
        raise UnreadableSourceError(
            f"the weights in {path} do not fit {arch}: {'; '.join(problems)}"
        )
    model.load_state_dict(state, strict=True)


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
