"""Write docs/api.md: every public name of the package with its signature and first doc line.

Run ``python -m pipelining_seq.tools.api_doc > docs/api.md``; ``tests/unit/test_api_doc.py``
fails when the committed page differs from what this prints, so the page follows the code.

What counts as public: ``__all__`` of :data:`MODULES` and of every subpackage of
``pipelining_seq.integrations``; for a class also its own public methods (those it
defines, not the ones it inherits from torch). Names that a package loads lazily
(listed in its ``_LAZY`` table because they import an optional dependency such as
torchtitan) are read from their source with :mod:`ast`, so the page is the same whether
that dependency is installed or not. The CLI section lists ``pipelining-seq``'s
subcommands.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["MODULES", "cli_section", "main", "module_section", "public_modules", "render"]

# The fixed public modules; integrations are found by walking their package.
MODULES = ["pipelining_seq", "pipelining_seq.models", "pipelining_seq.parallel"]

_HEADER = """\
# API reference

Generated from the code by `python -m pipelining_seq.tools.api_doc > docs/api.md`; do not edit by hand
(`tests/unit/test_api_doc.py` fails when this page is out of date). Every name below is in its module's
`__all__`; classes list the public methods they define themselves. How the pieces fit:
[design](design.md); a runnable example: [examples/seq1f1b_minimal.py](../examples/seq1f1b_minimal.py).
"""


def public_modules() -> list[str]:
    """The modules documented: :data:`MODULES` plus each ``pipelining_seq.integrations`` subpackage."""
    integrations = importlib.import_module("pipelining_seq.integrations")
    found = sorted(
        f"{integrations.__name__}.{info.name}"
        for info in pkgutil.iter_modules(integrations.__path__)
        if info.ispkg and not info.name.startswith("_")
    )
    return MODULES + found


def _first_line(doc: str | None) -> str:
    """The first sentence-line of a docstring, or a visible marker when there is none."""
    if not doc:
        return "(no docstring)"
    lines = inspect.cleandoc(doc).strip().splitlines()
    if not lines:
        return "(no docstring)"
    # reST to markdown: ``code`` -> `code`, :class:`X` -> `X`
    return re.sub(r":[a-z]+:`", "`", lines[0].strip().replace("``", "`"))


def _annotation(a: Any) -> str:
    if isinstance(a, str):  # ``from __future__ import annotations``: the source text
        return a
    text = inspect.formatannotation(a)
    return text.replace("typing.", "").replace("torch.nn.modules.module.", "torch.nn.")


def _default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return getattr(value, "__qualname__", repr(value))
    text = repr(value)
    if " at 0x" in text:  # object reprs carry addresses, which change per run
        return f"<{type(value).__name__}>"
    return text


def _signature(obj: Any) -> str:
    """``(a: int, *, b=1) -> str`` with annotations as written in the source."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parts: list[str] = []
    star_done = False
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        text = prefix + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (
            i + 1 == len(sig.parameters) or list(sig.parameters.values())[i + 1].kind is not p.POSITIONAL_ONLY
        ):
            parts.append("/")
    out = f"({', '.join(parts)})"
    if sig.return_annotation is not sig.empty:
        out += f" -> {_annotation(sig.return_annotation)}"
    return out


def _own_methods(cls: type) -> list[tuple[str, Any, str]]:
    """Public callables a class defines itself (properties excluded), in source order,
    each with its first doc line or, for an undocumented override, the class it overrides."""
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if not inspect.isfunction(member):
            continue
        doc = _first_line(member.__doc__)
        if not member.__doc__:
            base = next((b for b in cls.__mro__[1:] if name in vars(b)), None)
            if base is not None and base.__module__.startswith("pipelining_seq"):
                doc = f"overrides `{base.__name__}.{name}`"
            elif base is not None:  # torch's class names move between versions; the page must not
                doc = f"overrides {base.__module__.split('.')[0]}'s method of that name"
        out.append((name, member, doc))
    return out


def _class_signature(cls: type) -> str:
    sig = _signature(cls)
    if issubclass(cls, BaseException):
        return ""  # an exception takes its message
    return sig.replace(" -> None", "")


def _entry_for_object(name: str, obj: Any) -> list[str]:
    if inspect.isclass(obj):
        kind = "dataclass" if dataclasses.is_dataclass(obj) else "class"
        if issubclass(obj, BaseException):
            kind = "exception"
        lines = [f"### `{name}{_class_signature(obj)}`", "", f"*{kind}* — {_first_line(obj.__doc__)}", ""]
        for mname, meth, doc in _own_methods(obj):
            lines.append(f"- `{mname}{_signature(meth)}` — {doc}")
        if lines[-1] != "":
            lines.append("")
        return lines
    if callable(obj):
        return [f"### `{name}{_signature(obj)}`", "", _first_line(obj.__doc__), ""]
    return [f"### `{name} = {_default(obj)}`", "", "*constant*", ""]


def _ast_signature(node: ast.FunctionDef) -> str:
    """``_signature``'s format, from a function's syntax tree (annotations and defaults as written)."""
    a = node.args
    parts: list[str] = []

    def one(arg: ast.arg, default: ast.expr | None, prefix: str = "") -> str:
        text = prefix + arg.arg
        if arg.annotation is not None:
            text += f": {ast.unparse(arg.annotation)}"
        if default is not None:
            sep = " = " if arg.annotation is not None else "="
            text += sep + ast.unparse(default)
        return text

    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, d) in enumerate(zip(positional, defaults)):
        parts.append(one(arg, d))
        if a.posonlyargs and i + 1 == len(a.posonlyargs):
            parts.append("/")
    if a.vararg is not None:
        parts.append(one(a.vararg, None, "*"))
    elif a.kwonlyargs:
        parts.append("*")
    parts += [one(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg is not None:
        parts.append(one(a.kwarg, None, "**"))
    ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"({', '.join(parts)}){ret}"


def _lazy_entry(module: Any, name: str, source_module: str, attr: str) -> list[str]:
    """A lazily loaded name, read from its source file without importing it."""
    path = Path(module.__file__).parent / f"{source_module}.py"
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == attr:
            break
    else:
        raise LookupError(f"{module.__name__}._LAZY names {attr} in {path}, which does not define it")
    doc = _first_line(ast.get_docstring(node))
    note = f" (loaded on first use from `{module.__name__}.{source_module}`)"
    if isinstance(node, ast.FunctionDef):
        return [f"### `{name}{_ast_signature(node)}`", "", doc + note, ""]
    lines = [f"### `{name}`", "", f"*class* — {doc}{note}", ""]
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
            lines.append(f"- `{item.name}{_ast_signature(item)}` — {_first_line(ast.get_docstring(item))}")
    if lines[-1] != "":
        lines.append("")
    return lines


def module_section(modname: str) -> list[str]:
    """The markdown section of one module: its first doc line, then one entry per name."""
    module = importlib.import_module(modname)
    names = getattr(module, "__all__", None)
    if names is None:
        raise LookupError(f"{modname} has no __all__: every documented module must declare its public names")
    lazy: dict[str, tuple[str, str]] = getattr(module, "_LAZY", {})
    lines = [f"## `{modname}`", "", _first_line(module.__doc__), ""]
    for name in sorted(names, key=str.lower):
        if name in lazy:
            lines += _lazy_entry(module, name, *lazy[name])
        else:
            lines += _entry_for_object(name, getattr(module, name))
    return lines


def cli_section() -> list[str]:
    """``pipelining-seq`` subcommands and their one-line help, from the CLI's own table."""
    from .. import cli

    lines = [
        "## Command line: `pipelining-seq`",
        "",
        f"{_first_line(cli.__doc__)} `pipelining-seq COMMAND --help` lists a command's flags.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {help_text} |" for name, (_, help_text) in cli._COMMANDS.items()]
    lines += [
        "",
        "The torchtitan integration has its own entry point: "
        "`torchrun ... -m pipelining_seq.integrations.torchtitan` (see [torchtitan](torchtitan.md)).",
        "",
    ]
    return lines


def render() -> str:
    """The whole page, as ``main`` prints it."""
    modules = public_modules()
    lines = [_HEADER, "Modules: " + " · ".join(f"`{m}`" for m in modules) + " · command line", ""]
    for modname in modules:
        lines += module_section(modname)
    lines += cli_section()
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
