"""A run from a config file: five parts, each a class or function path with its arguments.

``jaxlight fit --config run.yaml`` (``jaxlight.configcli``) reads a run as::

    seed: 0
    model: {class_path: mypkg.nets.Net, init_args: {width: 128}}   # an nnx.Module; rngs from seed
    init: null                      # or torch, {checkpoint: PATH}, or {"encoder.*.kernel": jax.nn.initializers.orthogonal}
    loss: multiclass                # a built-in task, or mypkg.nets.loss_fn
    data: {class_path: mypkg.data.digits, init_args: {}}            # -> train[, val[, test]]
    optimizer: {class_path: optax.adamw, init_args: {learning_rate: 1.0e-3}}
    trainer: {max_epochs: 5, batch_size: 64, checkpoint: {dirpath: ckpt}, logging: {logger: csv}, callbacks: [], freeze: []}

Parsing, overrides, ``--print_config`` and ``--help`` are jsonargparse's (what LightningCLI is
built on): the classes and functions named are read for their parameters, types, defaults and
docstrings. What jsonargparse does not know is here: a function as a ``class_path`` (the data
function, an optax optimizer or schedule; a ``{class_path, init_args}`` value anywhere inside
``init_args`` is called too), the checks that a model is an ``nnx.Module`` and an optimizer an
optax transformation, and :class:`ConfigError`: one line naming the key and what was expected.

Parsing is two passes: the first reads the class paths (from the config files and the flags,
the later winning), the second parses everything with those classes' and functions'
signatures. Nothing is built or written before the whole config is valid.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from jaxlight.hparams import import_path
from jaxlight.recipes import MODEL_DIR, RECIPES

__all__ = ["BUILTIN_CONFIGS", "ConfigError", "Run", "build_data", "build_run", "builtin_config", "parse", "PARTS"]

PARTS = ("seed", "model", "init", "loss", "data", "optimizer", "trainer")
CALLED = ("model", "data", "optimizer")  # the parts given as {class_path, init_args}
TASK_NAMES = ("multiclass", "binary", "regression")
# The built-in configs lie beside their models (jaxlight/models/<name>.yaml); each is its model's recipe.
CONFIG_DIR = MODEL_DIR
BUILTIN_CONFIGS = tuple(RECIPES)

# Trainer settings a config file adds to TrainerConfig's: the callbacks, built from class paths.
TRAINER_EXTRAS = {
    "callbacks": (Any, [], "a list of {class_path, init_args} of jaxlight.callbacks.Callback subclasses"),
}


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the key and what was expected.

    ``key``: the config key at fault (``trainer.checkpoint.every_n_steps``), where one is known.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def builtin_config(name: str) -> Path:
    """The packaged config file of a built-in model (``jaxlight/models/<name>.yaml``)."""
    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"--config {name}: no such file and no built-in config of that name "
                          f"(built-in: {', '.join(BUILTIN_CONFIGS)})")
    return CONFIG_DIR / f"{name}.yaml"


# -- pass 1: the class paths -------------------------------------------------------------------


# A config file is small: these bound the time and memory of reading one, whatever it holds.
MAX_CONFIG_BYTES = 1 << 20   # 1 MiB
MAX_YAML_DEPTH = 100         # nested collections
MAX_YAML_VALUES = 100_000    # values, counting each alias as the values it stands for


class YAMLLimitError(ValueError):
    """A YAML document beyond :data:`MAX_YAML_DEPTH` or :data:`MAX_YAML_VALUES`."""


def _limited_loader():
    """PyYAML's ``SafeLoader`` (plain data only: no tags that build objects) that refuses, while
    composing and before anything is expanded, nesting deeper than :data:`MAX_YAML_DEPTH` and
    documents whose aliases stand for more than :data:`MAX_YAML_VALUES` values.

    PyYAML composes an alias as a reference to the anchored node, so a "billion laughs" file
    composes in a few kilobytes; it explodes in whatever walks the result (jsonargparse,
    ``json.dumps``). Each node's expanded size is counted here as it is composed (an alias
    counts as the whole node it names), so such a file is refused after a few hundred values.
    Composition recurses once per level, so the depth limit also keeps it far from Python's
    recursion limit.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._depth, self._sizes = 0, {}

        def compose_node(self, parent, index):
            if self._depth >= MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise YAMLLimitError(f"nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1})")
            self._depth += 1
            try:
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            if id(node) not in self._sizes:
                if isinstance(node, yaml.MappingNode):
                    children = [n for pair in node.value for n in pair]
                else:
                    children = node.value if isinstance(node, yaml.SequenceNode) else []
                size = 1 + sum(self._sizes[id(c)][0] for c in children)
                if size > MAX_YAML_VALUES:
                    raise YAMLLimitError(f"its aliases expand to more than {MAX_YAML_VALUES} values (line "
                                         f"{node.start_mark.line + 1}); a config holds far fewer")
                self._sizes[id(node)] = (size, node)
            return node

    return Loader


def load_yaml_text(text: str, where: str):
    """``text`` as plain data through the limited safe loader (:func:`_limited_loader`).

    Raises:
        ConfigError: one line naming ``where`` and the problem.
    """
    import yaml

    try:
        return yaml.load(text, Loader=_limited_loader())  # noqa: S506 - a SafeLoader subclass
    except YAMLLimitError as exc:
        raise ConfigError(f"{where}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: not readable YAML ({first})") from None


def _read_config_text(p: Path, path: str) -> str:
    """The text of a config file, refused as one line when it is too large, binary or not UTF-8."""
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: more than {MAX_CONFIG_BYTES >> 20} MiB; a config file is at most "
                          f"{MAX_CONFIG_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: a binary file, not YAML text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8)") from None
    if "\0" in text:
        raise ConfigError(f"--config {path}: a binary file, not YAML text (a NUL byte at offset {text.index(chr(0))})")
    return text


def _load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        p = builtin_config(path) if "/" not in path and not path.endswith((".yaml", ".yml")) else p
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    data = load_yaml_text(_read_config_text(p, path), f"--config {path}")
    if data is None:
        raise ConfigError(f"--config {path}: the file holds no config (it is empty or only comments); expected a "
                          f"mapping of the parts {', '.join(PARTS)}")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of the parts {', '.join(PARTS)}, "
                          f"got a {type(data).__name__}")
    return data


def refuse_moved_keys(trainer, where: str) -> None:
    """One error naming the new key for a key of the former flat ``trainer:`` section
    (``ckpt_dir`` is ``trainer.checkpoint.dirpath``: ``jaxlight.trainer_config.MOVED_KEYS``)."""
    from jaxlight.trainer_config import moved_key_error, MOVED_KEYS

    for key in trainer if isinstance(trainer, dict) else ():
        if key in MOVED_KEYS:
            raise moved_key_error(key, where)


def nest_moved_keys(trainer: dict) -> dict:
    """A recorded flat ``trainer:`` section (a checkpoint written before the sections) as the
    nested one: each moved key under its section."""
    from jaxlight.trainer_config import MOVED_KEYS

    out = {k: v for k, v in trainer.items() if k not in MOVED_KEYS}
    for key, value in trainer.items():
        if key in MOVED_KEYS:
            section, name = MOVED_KEYS[key].split(".")
            out.setdefault(section, {})[name] = value
    return out


def _class_path_of(value, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        path = value.get("class_path")
        if path is not None and not isinstance(path, str):
            raise ConfigError(f"{key}.class_path: expected a dotted import path string, got {path!r}")
        return path
    raise ConfigError(f"{key}: expected {{class_path: ..., init_args: {{...}}}}, got {value!r}")


def _flag_value(argv: list[str], i: int) -> tuple[str | None, int]:
    arg = argv[i]
    if "=" in arg:
        return arg.split("=", 1)[1], i + 1
    return (argv[i + 1] if i + 1 < len(argv) else None), i + 2


def prescan(argv: list[str], base: dict | None = None) -> tuple[list[str], dict]:
    """The arguments with built-in config names expanded and ``--model X`` written as
    ``--model.class_path X``, and the class path of each called part (later sources win).
    ``base``: a config (a checkpoint's record) that comes before every argument."""
    import json

    import yaml

    out, paths, i = [], {part: None for part in CALLED}, 0
    if base:
        for part in CALLED:
            if part in base:
                found = _class_path_of(base[part], part)
                paths[part] = found if found is not None else paths[part]
        out += ["--config", json.dumps(base)]
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name == "--config":
            value, i = _flag_value(argv, i)
            if value is None:
                raise ConfigError("--config: expected a YAML file or a built-in config name")
            data = _load_yaml(value)
            refuse_moved_keys(data.get("trainer"), f"--config {value}: trainer")
            for part in CALLED:
                if part in data:
                    found = _class_path_of(data[part], part)
                    if found is not None:
                        paths[part] = found
            path = Path(value) if Path(value).is_file() else builtin_config(value)
            out += ["--config", str(path)]
            continue
        part = name[2:].split(".")[0] if name.startswith("--") else None
        if part == "trainer":
            refuse_moved_keys({name[len("--trainer."):].split(".")[0]: None}, "--trainer")
            if name == "--trainer" and i + 1 < len(argv):
                refuse_moved_keys(load_yaml_text(argv[i + 1], name) if "=" not in arg else
                                  load_yaml_text(arg.split("=", 1)[1], name), "--trainer")
        if part in CALLED and name in (f"--{part}", f"--{part}.class_path"):
            value, i = _flag_value(argv, i)
            if value is None:
                raise ConfigError(f"{name}: expected a class path")
            if name == f"--{part}":
                try:
                    parsed = load_yaml_text(value, name)
                except ConfigError:
                    if any(c in value for c in "&*[{"):
                        raise
                    parsed = value
                if isinstance(parsed, dict):
                    found = _class_path_of(parsed, part)
                    paths[part] = found or paths[part]
                    if found:
                        out += [f"--{part}.class_path", found]
                    for k, v in (parsed.get("init_args") or {}).items():
                        out += [f"--{part}.init_args.{k}", yaml.safe_dump(v, default_flow_style=True).strip()
                                .removesuffix("\n...").strip()]
                    continue
            paths[part] = value
            out += [f"--{part}.class_path", value]
            continue
        if not arg.startswith("--") or "=" in arg:  # (a value: jsonargparse reads it as YAML, so it is checked too)
            value = arg.split("=", 1)[1] if arg.startswith("--") else arg
            if len(value) > 64 or any(c in value for c in "&*"):
                try:
                    flag = name if arg.startswith("--") else (argv[i - 1] if i and argv[i - 1].startswith("--") else "")
                    load_yaml_text(value, flag or "a command-line value")
                except ConfigError as exc:
                    if "refused" in str(exc):
                        raise
        out.append(arg)
        i += 1
    return out, paths


# -- what each part must be ----------------------------------------------------------------------


def _resolve_model_class(path: str):
    from flax import nnx

    obj = _import(path, "model.class_path")
    if not (inspect.isclass(obj) and issubclass(obj, nnx.Module)):
        kind = "class" if inspect.isclass(obj) else type(obj).__name__
        allow = f"; {ALLOW}" if _POLICY.get().recorded else ""
        raise ConfigError(f"model.class_path: {path} is a {kind} that is not a flax.nnx.Module subclass; "
                          f"expected an nnx.Module class{allow}")
    return obj


# -- where the code comes from ---------------------------------------------------------------


@dataclass(frozen=True)
class CodePolicy:
    """Where class paths may be imported from, and what may be called.

    Attributes:
        folders: the folders of code saved with a checkpoint (``jaxlight.trust.code_folders``).
        trust_code: import code saved in ``folders`` too (searched first), and call recorded
            functions that do not declare their kind.
        recorded: the config is a checkpoint's record, not the caller's: its class paths come
            from the installed environment only, and each callable is checked for the kind its
            place expects before any call (see :func:`recorded_kind`).
    """

    folders: tuple = ()
    trust_code: bool = False
    recorded: bool = False

    @property
    def strict(self) -> bool:
        return self.recorded and not self.trust_code


_POLICY: contextvars.ContextVar[CodePolicy] = contextvars.ContextVar("jaxlight_code_policy", default=CodePolicy())

ALLOW = ("name the code yourself (--config your.yaml), or add --trust_code if you trust the checkpoint (it then also "
         "imports code saved with it)")


@contextlib.contextmanager
def code_policy(policy: CodePolicy):
    """Parse and build under ``policy`` (:class:`CodePolicy`). Under a strict one, ``sys.path``
    also leaves out the checkpoint's folders meanwhile (``jaxlight.trust.installed_only``), so
    that no import on the way (jsonargparse resolves class paths in free-form values too) finds
    a module saved with the checkpoint."""
    from jaxlight.trust import installed_only

    token = _POLICY.set(policy)
    try:
        with installed_only(policy.folders if policy.strict else ()):
            yield
    finally:
        _POLICY.reset(token)


def _lookup(path: str):
    """The object ``path`` names, under the current :class:`CodePolicy`; ``ImportError`` (or
    ``jaxlight.trust.UntrustedCodeError``) when it cannot or may not be imported."""
    policy = _POLICY.get()
    if policy.recorded or policy.trust_code:
        from jaxlight.trust import resolve

        return resolve(path, policy.folders, policy.trust_code)
    return import_path(path)


def _import(path: str, key: str):
    from jaxlight.trust import UntrustedCodeError

    try:
        return _lookup(path)
    except UntrustedCodeError as exc:
        raise ConfigError(f"{key}: refused: {exc}; {ALLOW}") from None
    except ImportError as exc:
        raise ConfigError(f"{key}: unknown class path: {exc}") from None


def _returns(fn):
    """``fn``'s return annotation, resolved (a class: the class itself); None when it has none."""
    if inspect.isclass(fn):
        return fn
    try:
        returns = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return None
    if isinstance(returns, str):  # (``from __future__ import annotations``: evaluated as typing does)
        try:
            returns = eval(returns, dict(getattr(fn, "__globals__", {})))  # noqa: S307 - the installed module's own annotation
        except Exception:  # noqa: BLE001 - an annotation that does not resolve declares nothing
            return None
    return None if returns is inspect.Signature.empty else returns


def _mentions(annotation, *names: str) -> bool:
    """Whether a type annotation is, or is built from (``tuple[X, X | None]``), a type named in
    ``names``."""
    import typing

    if annotation is None:
        return False
    if getattr(annotation, "__name__", None) in names:
        return True
    return any(_mentions(a, *names) for a in typing.get_args(annotation))


def recorded_kind(fn, key: str, path: str) -> None:
    """Under a strict :class:`CodePolicy` (a checkpoint's record, not trusted), refuse before
    any call a callable that is not of the kind its place expects. What a record may call:

    - ``trainer.callbacks[i]``: a ``jaxlight.callbacks.Callback`` subclass;
    - ``optimizer``: a transformation class or a function annotated to return one (optax's
      functions are); a schedule inside its ``init_args``: a function annotated to return an
      ``optax.Schedule`` (or a transformation);
    - ``init``: a factory annotated to return a ``jax.nn.initializers.Initializer``;
    - ``data``: a function annotated to return an ``ArrayDataset`` (or a tuple/dict of them);
    - anything else called with recorded arguments: nothing.

    (The model's class is checked in :func:`_resolve_model_class`, the loss in :func:`_loss`.)
    """
    if not _POLICY.get().strict:
        return
    import optax

    from jaxlight.callbacks import Callback

    returns = _returns(fn)
    if key.startswith("trainer.callbacks"):
        ok, want = inspect.isclass(fn) and issubclass(fn, Callback), "a jaxlight.callbacks.Callback subclass"
    elif key == "optimizer":
        ok, want = _is_transformation_type(returns) is True, "an optax transformation (declared by its annotation)"
    elif key.startswith("optimizer.init_args"):
        ok = returns == optax.Schedule or _is_transformation_type(returns) is True or _mentions(returns, "Schedule")
        want = "a function annotated to return an optax.Schedule"
    elif key.startswith("init"):
        ok, want = _mentions(returns, "Initializer"), "a factory annotated to return a jax.nn.initializers.Initializer"
    elif key == "data":
        ok, want = _mentions(returns, "ArrayDataset"), "a function annotated to return ArrayDataset(s)"
    else:
        ok, want = False, "nothing (no recorded call is allowed here)"
    if not ok:
        kind = "class" if inspect.isclass(fn) else type(fn).__name__.replace("_", " ")
        raise ConfigError(f"{key}: refused: {path} (a {kind}, from the checkpoint's record) is not what a record may "
                          f"call here ({want}), so it is not called; {ALLOW}")


def _resolve_function(path: str, key: str):
    obj = _import(path, key)
    if not callable(obj):
        raise ConfigError(f"{key}: {path} is a {type(obj).__name__}, expected a function or class to call")
    return obj


def _is_transformation_type(annotation) -> bool | None:
    """Whether a return annotation promises an optax transformation (None: cannot tell)."""
    import optax

    if annotation is inspect.Signature.empty or isinstance(annotation, str):
        return None
    try:
        return inspect.isclass(annotation) and issubclass(annotation, optax.GradientTransformation)
    except TypeError:
        return None


def _check_optimizer_annotation(fn, path: str) -> None:
    """Refuse, before any call, a class or a function whose return annotation is not an optax
    transformation."""
    import optax

    if inspect.isclass(fn) and not issubclass(fn, optax.GradientTransformation):
        raise ConfigError(f"optimizer.class_path: {path} is a class that is not an optax transformation; expected "
                          f"a function returning one, e.g. optax.adamw")
    try:
        returns = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return
    if _is_transformation_type(returns) is False:
        name = getattr(returns, "__name__", str(returns))
        raise ConfigError(f"optimizer.class_path: {path} does not return an optax transformation (it returns "
                          f"{name}); expected e.g. optax.adamw")
    recorded_kind(fn, "optimizer", path)


def _loose(annotation) -> bool:
    """Parameters jsonargparse should not type-check: ones that take a schedule, a callable or
    an array (a ``{class_path, init_args}`` call spec is resolved here instead)."""
    text = str(annotation)
    return any(word in text for word in ("Callable", "Array", "ndarray", "Schedule")) or annotation is Any


# -- pass 2: the parser --------------------------------------------------------------------------


def make_parser(command: str, paths: dict):
    """The jsonargparse parser of ``jaxlight <command>`` for the given class paths."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from jaxlight.trainer_config import TrainerConfig

    p = ArgumentParser(prog=f"jaxlight {command}", exit_on_error=False, print_config=None,
                       description=f"{command} a model from a config: seed, model, init, loss, data, optimizer, "
                                   f"trainer (docs/config.md)")
    p.add_argument("--config", action=ActionConfigFile,
                   help="a YAML file of the run (or a built-in: " + ", ".join(BUILTIN_CONFIGS) + "); flags after it override it")
    p.add_argument("--print_config", action="store_true",
                   help="print the full resolved config (re-running it reproduces the run) and exit")
    p.add_argument("--ckpt_path", type=Optional[str], default=None,
                   help="best, last or a checkpoint folder: fit resumes from it; validate, test and predict "
                        "evaluate its weights (best/last: in trainer.checkpoint.dirpath)")
    if command != "fit":
        p.add_argument("--trust_code", action="store_true",
                       help="with --ckpt_path: also import code saved with the checkpoint (searched first), and "
                            "call what its recorded config names without checking its kind; only for checkpoints "
                            "you trust (docs/reliability.md)")
    p.add_argument("--seed", type=int, default=0, help="the model's nnx.Rngs, the data order and dropout")
    p.add_argument("--model.class_path", type=str, required=True,
                   help="an nnx.Module class, e.g. mypkg.nets.Net (its arguments: --model.init_args.*)")
    if paths.get("model"):
        cls = _resolve_model_class(paths["model"])
        p.add_class_arguments(cls, "model.init_args", skip={"rngs"}, fail_untyped=False, sub_configs=True)
    p.add_argument("--init", type=Any, default=None,
                   help="null (the model's own), torch (PyTorch's defaults), {checkpoint: PATH} (a checkpoint's "
                        "weights: fine-tuning), or {pattern: initializer}, or a list of these")
    p.add_argument("--loss", type=Any, default=None,
                   help="multiclass, binary, regression, or a dotted path to loss_fn(model, batch)")
    for part, what in (("data", "a function returning train[, val[, test]]"),
                       ("optimizer", "a function returning an optax transformation, e.g. optax.adamw")):
        p.add_argument(f"--{part}.class_path", type=str, required=True, help=what)
        if paths.get(part):
            fn = _resolve_function(paths[part], f"{part}.class_path")
            if part == "optimizer":
                _check_optimizer_annotation(fn, paths[part])
            else:
                recorded_kind(fn, part, paths[part])
            _add_function(p, fn, f"{part}.init_args")
    from jaxlight.trainer_config import SECTIONS

    # (each section a group of its own: trainer.checkpoint.every_n_steps, not a class_path spec)
    p.add_class_arguments(TrainerConfig, "trainer", skip={"run_config", "hparams", *SECTIONS})
    for name, section in SECTIONS.items():
        p.add_class_arguments(section, f"trainer.{name}")
    for name, (typ, default, help_) in TRAINER_EXTRAS.items():
        p.add_argument(f"--trainer.{name}", type=typ, default=default, help=help_)
    return p


def _add_function(p, fn, key: str) -> None:
    """The parameters of ``fn`` as ``--<key>.<name>``: typed where jsonargparse can check the type,
    free (a number, a string, a call spec) where the parameter takes a schedule or a callable."""
    try:
        params = _signature(fn).parameters
    except (TypeError, ValueError):
        return
    loose = [name for name, prm in params.items() if _loose(prm.annotation)]
    group = p.add_argument_group(f"{key} ({getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)})")
    if inspect.isclass(fn):
        p.add_class_arguments(fn, key, skip=set(loose), fail_untyped=False, sub_configs=True)
    else:
        p.add_function_arguments(fn, key, skip=set(loose), fail_untyped=False, sub_configs=True)
    for name in loose:
        prm = params[name]
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        required = prm.default is inspect.Parameter.empty
        group.add_argument(f"--{key}.{name}", type=Any, default=None if required else prm.default,
                           help=f"a number, or {{class_path, init_args}} of a function returning one "
                                f"(an optax schedule){' (required)' if required else ''}")


# -- errors: jsonargparse's messages as one line -------------------------------------------------


def one_line(message: str, paths: dict) -> str:
    """jsonargparse's error text as ``<key>: <what was expected>``."""
    text = str(message).strip()
    m = re.search(r'Key "([^"]+)" is required', text) or re.search(r"arguments are required: ([\w.]+)", text)
    if m:
        key = m.group(1)
        owner = next((paths[p] for p in CALLED if key.startswith(f"{p}.init_args.") and paths.get(p)), None)
        return (f"{key}: missing init argument (required by {owner}, which has no default for it)" if owner
                else f"{key}: missing (required)")
    m = re.search(r"Group '([^']+)' does not accept (?:option|nested key) '([^']+)'", text)
    if m:
        group = m.group(1)
        owner = next((paths[p] for p in CALLED if group.startswith(p) and paths.get(p)), None)
        return f"{group}.{m.group(2)}: unknown key" + (f" (not a parameter of {owner})" if owner else "")
    m = re.search(r"(?:Option|Key) '([^']+)' is not accepted", text)
    if m:
        key = m.group(1)
        part = key.split(".")[0]
        if part not in PARTS:
            return f"{part}: unknown part (expected {', '.join(PARTS)})"
        return f"{key}: unknown key"
    m = re.search(r"argument (--[\w.]+): expected one argument", text)
    if m:
        return f"{m.group(1)[2:]}: expected a value after {m.group(1)}"
    m = re.search(r"unrecognized arguments: (\S+)", text)
    if m:
        return f"{m.group(1).lstrip('-').split('=')[0]}: unknown key (not a parameter of the class or function named)"
    m = re.search(r'(?:Problem with given class_path|No action for key|Key) "([^"]+)"', text)
    keys = re.findall(r'[Pp]arser key "([^"]+)"', text)
    key = keys[-1] if keys else (m.group(1) if m else None)
    m2 = re.search(r"No action for key \"([^\"]+)\"", text)
    if m2:
        return f"{m2.group(1)}: unknown key (not a parameter of the class or function named)"
    if key and "Union subtypes" in text:
        kinds = [re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", t).replace("NoneType", "null")
                 for t in re.findall(r"- Expected an? (.+?)(?::.*)?$", text, re.M)]
        given = re.search(r"Given value: (.*)", text)
        if kinds:
            return f"{key}: expected {' or '.join(dict.fromkeys(kinds))}, got {given.group(1).strip() if given else '?'}"
    m3 = re.search(r"Expected a (<class '([\w.]+)'>|[\w.\[\] |]+)\.? ?Got value: (.*)", text)
    if key and m3:
        expected = m3.group(2) or m3.group(1)
        return f"{key}: expected {expected}, got {m3.group(3).strip()}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if key:
        detail = next((ln for ln in lines[1:] if not ln.startswith("Parser key")), lines[0])
        return f"{key}: {detail}"
    return lines[0] if lines else "invalid config"


# -- building --------------------------------------------------------------------------------------


def call_spec(value, key: str):
    """Resolve ``{class_path, init_args}`` values (recursively, inside lists and dicts): import
    and call them. Everything else is returned as it is."""
    if isinstance(value, dict) and "class_path" in value:
        extra = set(value) - {"class_path", "init_args"}
        if extra:
            raise ConfigError(f"{key}.{sorted(extra)[0]}: unknown key (a call spec has class_path and init_args)")
        fn = _resolve_function(value["class_path"], f"{key}.class_path")
        recorded_kind(fn, key, value["class_path"])
        args = {k: call_spec(v, f"{key}.init_args.{k}") for k, v in (value.get("init_args") or {}).items()}
        _bind(fn, args, key, value["class_path"])
        try:
            return fn(**args)
        except Exception as exc:  # noqa: BLE001 - the user's function refused its arguments
            raise ConfigError(f"{key}: {value['class_path']}(...) raised {type(exc).__name__}: {_first(exc)}") from None
    if isinstance(value, dict):
        return {k: call_spec(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [call_spec(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _resolve_args(fn, raw: dict, key: str) -> dict:
    """``init_args`` for ``fn``: call specs called, and for a parameter that takes a schedule or
    a callable, a dotted path imported; any other string there is refused."""
    try:
        params = _signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    out = {}
    for name, value in (raw or {}).items():
        value = call_spec(value, f"{key}.init_args.{name}")
        p = params.get(name)
        if isinstance(value, str) and p is not None and _loose(p.annotation) and p.annotation is not Any:
            if "." not in value:
                raise ConfigError(f"{key}.init_args.{name}: expected a number or {{class_path, init_args}} of a "
                                  f"function returning one (an optax schedule), got {value!r}")
            value = _import(value, f"{key}.init_args.{name}")
        out[name] = value
    return out


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _signature(fn):
    """The parameters a call takes (a class: its ``__init__``'s, without ``self``; NNX's
    metaclass hides them from ``inspect.signature(cls)``)."""
    if inspect.isclass(fn):
        params = list(inspect.signature(fn.__init__).parameters.values())[1:]
        return inspect.Signature(params)
    return inspect.signature(fn)


def _bind(fn, args: dict, key: str, path: str) -> None:
    try:
        sig = _signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in args:
        if name not in params and not takes_kwargs:
            raise ConfigError(f"{key}.init_args.{name}: unknown argument of {path}")
    for name, p in params.items():
        if (p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and name not in args and name != "rngs"):
            raise ConfigError(f"{key}.init_args.{name}: missing init argument (required by {path})")


@dataclass
class Run:
    """A config turned into objects: what ``jaxlight fit`` trains."""

    config: dict                       # the resolved config (plain data; what --print_config prints)
    seed: int
    model: Any
    loss_fn: Any
    train: Any
    val: Any
    test: Any
    tx: Any
    trainer_config: Any                # a jaxlight.trainer_config.TrainerConfig
    callbacks: list                    # trainer.callbacks, built


def _loss(value, key: str = "loss"):
    from jaxlight.tasks import TASKS

    if value is None:
        raise ConfigError(f"{key}: missing; expected a built-in task ({', '.join(TASK_NAMES)}) or a dotted path "
                          f"to loss_fn(model, batch)")
    if isinstance(value, str) and value in TASKS:
        return TASKS[value]()
    if isinstance(value, str):
        if "." not in value:
            raise ConfigError(f"{key}: {value!r} is not a built-in task ({', '.join(TASK_NAMES)}) nor a dotted path")
        fn = _import(value, key)
        if _POLICY.get().strict and not (inspect.isfunction(fn) and _required_positional(fn) >= 2):
            raise ConfigError(f"{key}: refused: {value} (from the checkpoint's record) is not a function "
                              f"loss_fn(model, batch), so it is not called; {ALLOW}")
        if inspect.isfunction(fn) and _required_positional(fn) < 2:  # a factory: multiclass, or one of yours
            try:
                fn = fn()
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"{key}: {value}() raised {type(exc).__name__}: {_first(exc)}") from None
    elif isinstance(value, dict):
        fn = call_spec(value, key)
    else:
        raise ConfigError(f"{key}: expected a task name or a dotted path, got {value!r}")
    if not callable(fn) or inspect.isclass(fn):
        raise ConfigError(f"{key}: {value} gave a {type(fn).__name__}, expected a function loss_fn(model, batch) "
                          f"(or a factory returning one)")
    return fn


def _init(model, value, seed: int, key: str = "init"):
    from jaxlight.models.init import init_params, init_torch

    if value is None:
        return model
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if item == "torch":
            init_torch(model, seed)
        elif isinstance(item, dict) and set(item) == {"checkpoint"}:
            _init_from_checkpoint(model, item["checkpoint"], f"{where}.checkpoint")
        elif isinstance(item, dict) and "class_path" not in item:
            inits = {pattern: _initializer(spec, f"{where}.{pattern}") for pattern, spec in item.items()}
            try:
                init_params(model, inits, seed)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            raise ConfigError(f"{where}: expected torch, {{checkpoint: PATH}} or {{pattern: initializer}}, got {item!r}")
    return model


def _init_from_checkpoint(model, path, key: str) -> None:
    """The parameters and batch statistics of a checkpoint (a ``step_*`` folder, or the newest
    good one under a folder) into the freshly built ``model``: a fine-tuning start. Weights
    only: no optimizer state, step or data position (``--ckpt_path`` resumes a run instead)."""
    from jaxlight.checkpoint import CheckpointError, load_model

    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}: expected the path of a checkpoint folder, got {path!r}")
    try:
        load_model(path, model, which="last")
    except CheckpointError as exc:
        raise ConfigError(f"{key}: {_first(exc)}") from None
    model.train()  # (load_model leaves it in eval mode, for inference)


def _initializer(spec, key: str):
    """``"torch"``-free initialiser specs: a dotted path to ``init(key, shape, dtype)`` or to a
    factory (called with no arguments), or ``{class_path, init_args}`` of a factory."""
    if isinstance(spec, dict):
        return call_spec(spec, key)
    if not isinstance(spec, str):
        raise ConfigError(f"{key}: expected an initializer path (jax.nn.initializers.orthogonal), got {spec!r}")
    fn = _resolve_function(spec, key)
    params = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        recorded_kind(fn, key, spec)
    return fn if params else fn()


def _data(fn, args: dict, path: str):
    from jaxlight.data import ArrayDataset

    from jaxlight.data import MNISTError

    try:
        out = fn(**args)
    except MNISTError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's data function failed: one line, not a traceback
        raise ConfigError(f"data: {path}(...) raised {type(exc).__name__}: {_first(exc)}") from None
    if isinstance(out, dict) and "train" in out:
        parts = (out.get("train"), out.get("val"), out.get("test"))
    elif isinstance(out, (tuple, list)) and 1 <= len(out) <= 3 and not isinstance(out, ArrayDataset):
        parts = tuple(out) + (None,) * (3 - len(out))
    else:
        parts = (out, None, None)
    if parts[0] is None:
        raise ConfigError(f"data: {path}(...) returned no training set; expected train[, val[, test]]")
    import numpy as np

    for name, part in zip(("train", "val", "test"), parts):
        if isinstance(part, np.ndarray) or (hasattr(part, "shape") and hasattr(part, "dtype")):
            raise ConfigError(f"data: {path}(...) returned a bare array as {name}; expected an ArrayDataset "
                              f"(ArrayDataset(x, y) or ArrayDataset({{...}})) or a re-iterable of batches")
        if part is not None and not (isinstance(part, ArrayDataset) or hasattr(part, "__iter__") or callable(part)):
            raise ConfigError(f"data: {path}(...) returned a {type(part).__name__} as {name}; expected an "
                              f"ArrayDataset or a re-iterable of batches")
    return parts


def build_run(cfg: dict, load_data: bool = True) -> Run:
    """Objects from a parsed config (plain dict); raises :class:`ConfigError` naming the key."""
    import optax
    from flax import nnx

    from jaxlight.callbacks import Callback
    from jaxlight.trainer_config import TrainerConfig

    seed = cfg["seed"]
    # Model: its class is checked in the parser already; the arguments are jsonargparse's.
    cls = _resolve_model_class(cfg["model"]["class_path"])
    init_args = _resolve_args(cls, cfg["model"].get("init_args"), "model")
    _bind(cls, init_args, "model", cfg["model"]["class_path"])
    kwargs = dict(init_args)
    if "rngs" in inspect.signature(cls.__init__).parameters:
        kwargs["rngs"] = nnx.Rngs(seed)
    try:
        model = cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor refused its arguments
        raise ConfigError(f"model: {cfg['model']['class_path']}(...) raised {type(exc).__name__}: {_first(exc)}") from None
    from jaxlight.hparams import HParams

    model.hparams = HParams(class_path=cfg["model"]["class_path"], init_args=cfg["model"].get("init_args") or {})
    _init(model, cfg.get("init"), seed)
    loss_fn = _loss(cfg.get("loss"))

    # Optimizer: checked before it is called when its annotation tells, and after otherwise.
    opt_path = cfg["optimizer"]["class_path"]
    opt_fn = _resolve_function(opt_path, "optimizer.class_path")
    _check_optimizer_annotation(opt_fn, opt_path)
    opt_args = _resolve_args(opt_fn, cfg["optimizer"].get("init_args"), "optimizer")
    opt_args = {k: v for k, v in opt_args.items() if not (v is None and _required(opt_fn, k))}
    _bind(opt_fn, opt_args, "optimizer", opt_path)
    try:
        tx = opt_fn(**opt_args)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"optimizer: {opt_path}(...) raised {type(exc).__name__}: {_first(exc)}") from None
    if not isinstance(tx, optax.GradientTransformation):
        raise ConfigError(f"optimizer.class_path: {opt_path}(...) returned a {type(tx).__name__}, not an optax "
                          f"transformation; expected e.g. optax.adamw")

    trainer_cfg = dict(cfg["trainer"])
    extras = {k: trainer_cfg.pop(k) for k in TRAINER_EXTRAS}
    trainer_config = TrainerConfig(**trainer_cfg)  # (ConfigError naming the key: the fields check themselves)
    if trainer_config.freeze:  # (the Trainer freezes them: jaxlight.optim.wrap_optimizer)
        from jaxlight.models.init import param_paths
        import fnmatch

        names = param_paths(model)
        for pattern in trainer_config.freeze:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ConfigError(f"trainer.freeze: pattern {pattern!r} matches no parameter of "
                                  f"{type(model).__name__} ({', '.join(names[:6])}{'...' if len(names) > 6 else ''})",
                                  key="trainer.freeze")
    callbacks = []
    raw = extras["callbacks"] or []
    if not isinstance(raw, list):
        raise ConfigError(f"trainer.callbacks: expected a list of {{class_path, init_args}}, got {raw!r}")
    for i, spec in enumerate(raw):
        cb = call_spec({"class_path": spec} if isinstance(spec, str) else spec, f"trainer.callbacks[{i}]")
        if not isinstance(cb, Callback):
            raise ConfigError(f"trainer.callbacks[{i}]: {type(cb).__name__} is not a jaxlight.callbacks.Callback")
        callbacks.append(cb)

    train, val, test = build_data(cfg) if load_data else (None, None, None)
    return Run(cfg, seed, model, loss_fn, train, val, test, tx, trainer_config, callbacks)


def build_data(cfg: dict) -> tuple:
    """``(train, val, test)`` of a parsed config's ``data`` part (val, test: None when the data
    function returns none); raises :class:`ConfigError` naming the key."""
    data_path = cfg["data"]["class_path"]
    data_fn = _resolve_function(data_path, "data.class_path")
    recorded_kind(data_fn, "data", data_path)
    data_args = _resolve_args(data_fn, cfg["data"].get("init_args"), "data")
    _bind(data_fn, data_args, "data", data_path)
    return _data(data_fn, data_args, data_path)


def _required_positional(fn) -> int:
    params = inspect.signature(fn).parameters.values()
    return sum(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params)


def _required(fn, name: str) -> bool:
    try:
        p = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is inspect.Parameter.empty


def _split_nested(argv: list[str], paths: dict) -> tuple[list[str], list[tuple[str, list[str], str]]]:
    """Take out the flags that set a key inside a call spec held by a schedule-like parameter
    (``--optimizer.init_args.learning_rate.init_args.peak_value 0.01``): jsonargparse would
    replace the whole spec with them, so they are applied to the parsed config instead."""
    loose = {}
    for part in ("data", "optimizer", "model"):
        try:
            fn = _lookup(paths[part]) if paths.get(part) else None
            params = _signature(fn).parameters if fn is not None else {}
        except (ImportError, TypeError, ValueError):
            continue
        loose[part] = {n for n, p in params.items() if _loose(p.annotation)}
    out, nested, i = [], [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        keys = name[2:].split(".") if name.startswith("--") else []
        if len(keys) > 3 and keys[1] == "init_args" and keys[2] in loose.get(keys[0], ()):
            value, i = _flag_value(argv, i)
            if value is None:
                raise ConfigError(f"{name[2:]}: expected a value after {name}")
            nested.append((name[2:], keys, value))
            continue
        out.append(argv[i])
        i += 1
    return out, nested


def _apply_nested(plain: dict, nested) -> None:
    for flag, keys, value in nested:
        target = plain[keys[0]]["init_args"].get(keys[2])
        if not isinstance(target, dict):
            raise ConfigError(f"{flag}: {'.'.join(keys[:3])} is {target!r}, not a {{class_path, init_args}} to set "
                              f"a key in")
        for k in keys[3:-1]:
            target = target.setdefault(k, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{flag}: {k} is not a mapping")
        target[keys[-1]] = load_yaml_text(value, flag)


def parse(command: str, argv: list[str], base: dict | None = None):
    """``(parser, namespace, config dict, class paths)`` for ``jaxlight <command> <argv>``.

    ``base``: a config the arguments override (a checkpoint's record; see ``jaxlight.configcli``).

    Raises:
        ConfigError: one line naming the key and what was expected.
        SystemExit: ``--help`` (exit code 0).
    """
    import argparse

    argv, paths = prescan(list(argv), base)
    argv, nested = _split_nested(argv, paths)
    parser = make_parser(command, paths)
    try:
        with warnings.catch_warnings():
            # (jsonargparse's notice that it will refuse some class paths in free-form values: jaxlight
            # resolves and checks those itself, see CodePolicy)
            for text in (r"[\s\S]*import path denylist", r"\s*By default only one JsonargparseDeprecationWarning"):
                warnings.filterwarnings("ignore", message=text)
            ns = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        raise ConfigError(one_line(str(exc), paths)) from None
    except TypeError as exc:  # (jsonargparse on a value it cannot hold)
        raise ConfigError(one_line(str(exc), paths)) from None
    cfg = ns.clone()
    for key in ("config", "print_config", "ckpt_path", "trust_code", "__path__"):
        if key in cfg:
            del cfg[key]
    plain = cfg.as_dict()
    for part in ("init", "loss"):
        plain.setdefault(part, None)
    for part in CALLED:
        args = plain[part].get("init_args") or {}
        try:  # (in the signature's order, as the docs list them)
            order = list(_signature(_lookup(plain[part]["class_path"])).parameters)
            args = dict(sorted(args.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
        except (ImportError, TypeError, ValueError):
            pass
        plain[part] = {"class_path": plain[part]["class_path"], "init_args": args}
    _apply_nested(plain, nested)
    return parser, ns, plain, paths


def dump(plain: dict) -> str:
    """The resolved config as YAML, parts in their order (what ``--print_config`` prints)."""
    import yaml

    ordered = {k: plain[k] for k in PARTS if k in plain}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)
