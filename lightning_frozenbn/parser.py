"""ConciseErrorsParser: LightningCLI's parser, jsonargparse's union errors condensed to the key and value at fault."""

from __future__ import annotations

import difflib
import inspect
import pydoc
import re
import sys
import textwrap
from typing import Any, ClassVar, NoReturn

from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

__all__ = ["ConciseErrorsParser", "init_arguments"]


class ConciseErrorsParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line naming the key and value at fault (see :func:`_concise`).

    Used by the package's commands (``parser_class``); a project's own LightningCLI can pass it too.
    A subclass may set :attr:`other_commands` (class path -> command) to name the command that takes a
    class this one refuses ("Import path ... does not correspond to a subclass of ...").
    """

    other_commands: ClassVar[dict[str, str]] = {}

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(self._suggest(_concise(message)), ex)

    def _suggest(self, message: str) -> str:
        """The closest accepted option for an unknown one; the command for a class this one does not take.

        ``unrecognized arguments: --trainer.max_epocs 3`` gets ``Did you mean '--trainer.max_epochs'?``,
        a config's ``trainr: {max_epochs: 1}`` gets ``Did you mean 'trainer.max_epochs'?``.
        """
        options = list(self._option_string_actions)
        for action in self._actions:  # the subcommands' own options (fit, validate, ...)
            for sub in (action.choices or {}).values() if isinstance(action.choices, dict) else ():
                options += list(getattr(sub, "_option_string_actions", {}))
        unknown = re.match(r"unrecognized arguments: (--[\w.]+)", message)
        if unknown is not None:
            close = difflib.get_close_matches(unknown.group(1), options, n=1)
            return f"{message}. Did you mean {close[0]!r}?" if close else message
        in_config = re.match(r"Subcommand '\w+' does not accept option '([\w.]+)'", message)
        if in_config is not None:  # a key of a config file (the flag form is "unrecognized arguments")
            keys = [o.removeprefix("--") for o in options if o.startswith("--")]
            close = difflib.get_close_matches(in_config.group(1), keys, n=1, cutoff=0.75)
            return f"{message}. Did you mean {close[0]!r}?" if close else message
        refused = re.search(r"Import path ([\w.]+) does not correspond to a subclass of (\w+)", message)
        cls = pydoc.locate(refused.group(1)) if refused is not None else None
        for path, command in self.other_commands.items() if isinstance(cls, type) else ():
            other = pydoc.locate(path)
            if isinstance(other, type) and issubclass(cls, other):
                return (
                    f"{message}: {cls.__name__} is for the `{command}` command, not `{self.prog.split()[0]}`. "
                    f"Run `{command} fit --config ...` with this config."
                )
        return message

    @override
    def print_usage(self, file: Any = None) -> None:
        """One line: the full usage lists every Trainer flag (~60 lines) above the error; ``--help`` has it."""
        (file or sys.stdout).write(f"usage: {self.prog} [options]\n")


def init_arguments(cls: type) -> dict[str, Any]:
    """Each ``__init__`` argument's default, read across the class hierarchy.

    A subclass written as ``def __init__(self, num_classes, embed_dim=256, **kwargs)`` passes the base's
    arguments through ``**kwargs`` (jsonargparse resolves them from the base), so its own signature alone
    does not list them: the bases are read until a signature without ``**kwargs``.
    """
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                defaults.setdefault(p.name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return defaults


_UNION = "Does not validate against any of the Union subtypes"


def _concise(message: str) -> str:
    """The report of a bad value inside a union, as one line: ``key (class): what was expected, got what``.

    A model, data module or callback given by ``class_path`` is a union with None to jsonargparse, as
    are many Trainer flags, so a typo there is reported as every subtype's failure plus the whole given
    value: ``model.init_args.norm: Expected a typing.Literal['frozen', 'eval', 'train', 'sync']. Got
    value: frozn`` is in there, under a dozen lines of the parser's bookkeeping.
    """
    if _UNION not in message:
        return message
    head, _, rest = message.partition(_UNION)
    rest = textwrap.dedent(rest)
    keys = re.findall(r'Parser key "([^"]+)"', head)
    errors = rest.partition("\nErrors:\n")[2].partition("\nGiven value type:")[0]
    given = rest.rpartition("\nGiven value: ")[2].strip()
    bullets = [b.strip() for b in re.split(r"\n {0,4}- ", "\n" + textwrap.dedent(errors)) if b.strip()]
    bullets = [b for b in bullets if b != "Expected a <class 'NoneType'>"]
    if bullets and all(b.startswith("Expected a ") and "\n" not in b for b in bullets):
        expected = " or ".join(b.removeprefix("Expected a ") for b in bullets)
        return _readable(f"{'.'.join(keys) or 'value'}: expected {expected}; got {given}")
    if len(bullets) != 1:
        return message
    lines = [line.strip() for line in bullets[0].splitlines() if line.strip()]
    owner = re.match(r"Problem with given class_path '([^']+)':", lines[0])
    if owner:
        lines = lines[1:]
        keys.append("init_args")
    inner = [line for line in lines if not re.fullmatch(r'Parser key "[^"]+":', line)]
    keys += [k for line in lines for k in re.findall(r'^Parser key "([^"]+)":$', line)]
    text = _concise("\n".join(inner)) if _UNION in "\n".join(inner) else " ".join(inner)
    unknown = re.fullmatch(r"Option '([^']+)' is not accepted", text)
    cls = pydoc.locate(owner.group(1)) if owner and unknown else None
    if unknown and isinstance(cls, type):
        close = difflib.get_close_matches(unknown.group(1), list(init_arguments(cls)), n=1)
        text += f". Did you mean {close[0]!r}?" if close else f". See `{cls.__name__}`'s arguments in --help."
    where = f" ({owner.group(1)})" if owner else ""
    return _readable(f"{'.'.join(keys)}{where}: {text}" if keys else text)


def _readable(text: str) -> str:
    """Type names as a user reads them: ``one of ['a', 'b']`` for ``a typing.Literal['a', 'b']``, ``type int``."""
    text = re.sub(r"(?:\ba )?typing\.Literal\[", "one of [", text)
    return re.sub(r"(?:\ba )?<class '(\w+)'>", r"type \1", text)
