"""An argparse parser that helps: "did you mean", one short usage line, never a page of usage.

argparse on Python 3.11 answers `farm submit txt2img --promt x` with the top-level usage and
"unrecognized arguments", a typo'd subcommand with the whole list of choices, and a missing
`--model` with twenty lines of usage. `FarmParser` (the class of every `farm` parser, its
subparsers included: argparse makes them of the parent's class) answers in two lines, the
error with a suggestion where one is close, then a one-line usage of the command that failed:

    $ farm submit txt2img --model tiny --promt "a fox"
    farm submit: error: unrecognized argument --promt; did you mean --prompt?
    usage: farm submit {txt2img,img2img,inpaint,style,finetune} --model MODEL [options] (--help: all)

Suggestions come from `difflib`, as Python 3.14's argparse makes them (`suggest_on_error`).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn


def did_you_mean(word: str, choices: Iterable[str], *, quote: bool = True) -> str:
    """`; did you mean 'x'?` for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" if quote else f"; did you mean {close[0]}?"


class FarmParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line plus one usage line (module doc)."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # blamed on the subcommand that was given them, not on `farm` itself
            self.chosen(ns).unrecognized(extras)
        return ns

    def chosen(self, ns: argparse.Namespace) -> FarmParser:
        """The deepest subcommand parser the arguments selected (`farm batch submit`'s)."""
        parser: FarmParser = self
        while True:
            action = next((a for a in parser._actions if isinstance(a, _SubParsers)), None)
            name = getattr(ns, action.dest, None) if action else None
            if action is None or name not in action.choices:
                return parser
            parser = action.choices[name]

    def unrecognized(self, extras: list[str]) -> NoReturn:
        first = extras[0]
        if first.startswith("-"):
            flag = first.split("=", 1)[0]
            options = [o for o in self._option_string_actions if o.startswith("--")]
            self.error(f"unrecognized argument {flag}{did_you_mean(flag, options, quote=False)}")
        self.error(f"unrecognized argument {first!r}")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            names = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action,
                f"invalid choice {value!r}{did_you_mean(str(value), names)} "
                f"(choose from {', '.join(names)})",
            )

    def short_usage(self) -> str:
        """`usage: farm submit KIND --model MODEL [options] (--help: all)`: positionals and
        required flags only, on one line."""
        formatter = self._get_formatter()
        parts = [self.prog]
        optional = False
        for action in self._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if not action.option_strings:
                metavar = formatter._get_default_metavar_for_positional(action)
                parts.append(formatter._format_args(action, metavar))
            elif action.required:
                metavar = formatter._get_default_metavar_for_optional(action)
                parts.append(
                    f"{action.option_strings[0]} {formatter._format_args(action, metavar)}"
                )
            else:
                optional = True
        return f"usage: {' '.join(parts)}{' [options]' if optional else ''} (--help: all)"

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.short_usage()}\n")


_SubParsers = argparse._SubParsersAction
