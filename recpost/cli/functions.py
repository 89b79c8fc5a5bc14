"""The commands that are plain typed functions (``recpost experiment | bench | export | recommend``, litgpt's
style): the function's signature and docstring are its command line and ``--help``."""

from __future__ import annotations

from argparse import ArgumentError

from recpost.cli.arguments import explain_parse_error
from recpost.core.errors import RecpostError


def run_function_cli(name: str, module: str, function: str, args: list[str]) -> None:
    """``recpost <name> <args>``: ``module.function`` run with arguments from its typed signature.

    (``jsonargparse.CLI`` would reserve ``--config`` for its own config files; for ``experiment``,
    ``--config`` is the experiment YAML, as users expect.) A boolean ``some_flag`` is switched on by
    ``--some-flag`` or ``--some_flag`` alone, as users spell flags (``--some_flag false`` still works).
    """
    import importlib
    import inspect

    from jsonargparse import ArgumentParser

    fn = getattr(importlib.import_module(module), function)
    booleans = {f"--{spelling}": f"--{p}" for p, param in inspect.signature(fn).parameters.items()
                if param.annotation in (bool, "bool") for spelling in {p, p.replace("_", "-")}}
    args = _boolean_flags(args, booleans)
    parser = ArgumentParser(prog=f"recpost {name}", description=fn.__doc__.splitlines()[0], exit_on_error=False)
    parser.add_function_arguments(fn)
    try:
        parsed = parser.parse_args(args)
    except ArgumentError as exc:
        raise RecpostError(explain_parse_error(str(exc), [o.lstrip("-") for o in parser._option_string_actions])) from None
    fn(**parsed.as_dict())


def _boolean_flags(args: list[str], booleans: dict[str, str]) -> list[str]:
    """``args`` with each boolean flag (``booleans``: its spellings -> ``--<parameter>``) given alone as
    ``--<parameter>=true``, and given with a value (``--quick false``) as ``--<parameter> <value>``."""
    out = []
    for i, arg in enumerate(args):
        if arg not in booleans:
            out.append(arg)
        elif i + 1 < len(args) and args[i + 1].lower() in ("true", "false", "yes", "no"):
            out.append(booleans[arg])
        else:
            out.append(f"{booleans[arg]}=true")
    return out
