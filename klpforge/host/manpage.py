"""Man pages and bash completion generated from klpforge's argument parser, so they never drift from it.

``klpforge.1`` lists the commands; ``klpforge-<command>.1`` documents one (usage, description, every option
with its help, the exit codes from the epilog). Roff per man-pages(7)/groff_man(7): ``.TH``, ``.SH``,
``.TP``, ``\\fB``/``\\fI``, text lines starting with ``.`` or ``'`` escaped with ``\\&``, ``-`` as ``\\-``.

The bash completion completes command names, each command's options, the choices of an option that has
them, and files (``.ko`` first) elsewhere.
"""

from __future__ import annotations

import argparse
import datetime
import re

from .. import __version__

__all__ = ["subcommands", "man_pages", "bash_completion", "options_of"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Command name -> its parser, in ``--help`` order."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices.items())
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return {c.dest: c.help or "" for c in a._choices_actions}
    return {}


def options_of(parser: argparse.ArgumentParser) -> list[str]:
    """Every documented option string of ``parser`` (``-o``, ``--output``, ...): not the hidden ones
    (``help=SUPPRESS``: kpatch-build's flags, which ``build`` only answers with klpforge's equivalent)."""
    return [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln.startswith((".", "'")) else ln) for ln in text.split("\n"))


def _date() -> str:
    # SOURCE_DATE_EPOCH (reproducible builds) or a fixed date: the pages must not change by themselves
    import os

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).strftime("%Y-%m-%d")
    return "2026-01-01"


def _option_lines(p: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    fmt = p._get_formatter()
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            metavar = "" if a.nargs == 0 else " " + fmt._format_args(a, a.dest.upper())
            head = ", ".join(f"\\fB{_esc(s)}\\fR" + (f"\\fI{_esc(metavar)}\\fR" if metavar else "")
                             for s in a.option_strings)
        else:
            head = f"\\fI{_esc(fmt._metavar_formatter(a, a.dest)(1)[0])}\\fR"
        help_text = (a.help or "") % {"default": a.default, "prog": p.prog} if a.help else ""
        if a.choices and a.option_strings:
            help_text += f" (one of: {', '.join(map(str, a.choices))})"
        out += [".TP", head, _esc(help_text)]
    return out


def _usage(p: argparse.ArgumentParser) -> str:
    u = p.format_usage().strip()
    return re.sub(r"\s+", " ", u.removeprefix("usage: "))


def man_pages(parser: argparse.ArgumentParser) -> dict[str, str]:
    """File name -> roff text: ``klpforge.1`` and one ``klpforge-<command>.1`` per command."""
    date = _date()
    cmds = subcommands(parser)
    helps = _helps(parser)
    pages: dict[str, str] = {}
    see = ", ".join(f"\\fBklpforge\\-{_esc(c)}\\fR(1)" for c in cmds)
    top = [f'.TH KLPFORGE 1 "{date}" "klpforge {__version__}" "User Commands"', ".SH NAME",
           "klpforge \\- " + _esc(parser.description or ""), ".SH SYNOPSIS",
           "\\fBklpforge\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]", ".SH COMMANDS"]
    for c in cmds:
        top += [".TP", f"\\fB{_esc(c)}\\fR", _esc(helps.get(c, ""))]
    top += [".SH OPTIONS", *_option_lines(parser), ".SH EXIT STATUS", _esc(parser.epilog or ""),
            ".SH SEE ALSO", see]
    pages["klpforge.1"] = "\n".join(top) + "\n"
    for c, p in cmds.items():
        lines = [f'.TH KLPFORGE\\-{_esc(c.upper())} 1 "{date}" "klpforge {__version__}" "User Commands"',
                 ".SH NAME", f"klpforge\\-{_esc(c)} \\- {_esc(helps.get(c, ''))}", ".SH SYNOPSIS",
                 _esc(_usage(p)), ".SH DESCRIPTION", _esc(p.description or helps.get(c, ""))]
        sub = subcommands(p)
        if sub:
            sh = _helps(p)
            lines.append(".SH SUBCOMMANDS")
            for s, sp in sub.items():
                lines += [".TP", f"\\fB{_esc(s)}\\fR", _esc(sh.get(s, "")), ".RS", _esc(_usage(sp)), ".RE"]
                opts = _option_lines(sp)
                if opts:
                    lines += [".RS", *opts, ".RE"]
        lines += [".SH OPTIONS", *_option_lines(p)]
        if p.epilog:
            lines += [".SH EXIT STATUS", _esc(p.epilog)]
        lines += [".SH SEE ALSO", "\\fBklpforge\\fR(1)"]
        pages[f"klpforge-{c}.1"] = "\n".join(lines) + "\n"
    return pages


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for ``klpforge`` (source it, or install it as
    ``/usr/share/bash-completion/completions/klpforge``)."""
    cmds = subcommands(parser)
    cases = []
    choice_cases = []
    for c, p in cmds.items():
        cases.append(f"        {c}) opts={' '.join(options_of(p))!r}; subs={' '.join(subcommands(p))!r} ;;")
        for a in p._actions:
            if a.choices and a.option_strings and not isinstance(a, argparse._SubParsersAction):
                for s in a.option_strings:
                    choice_cases.append(f"        {c}:{s}) COMPREPLY=($(compgen -W {' '.join(map(str, a.choices))!r}"
                                        f' -- "$cur")); return ;;')
    top_opts = " ".join(options_of(parser))
    return f"""# bash completion for klpforge {__version__} (generated by `klpforge completion bash`)
_klpforge() {{
    local cur prev cmd opts subs i
    COMPREPLY=()
    cur=${{COMP_WORDS[COMP_CWORD]}}
    prev=${{COMP_WORDS[COMP_CWORD-1]}}
    cmd=
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in -*) ;; *) cmd=${{COMP_WORDS[i]}}; break ;; esac
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W {(' '.join(cmds) + ' ' + top_opts)!r} -- "$cur"))
        return
    fi
    case $cmd:$prev in
{chr(10).join(choice_cases) or '        :) ;;'}
    esac
    opts=; subs=
    case $cmd in
{chr(10).join(cases)}
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ -n $subs ]]; then
        COMPREPLY=($(compgen -W "$subs" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -X '!*.ko' -- "$cur") $(compgen -d -- "$cur"))
        [[ ${{#COMPREPLY[@]}} -eq 0 ]] && COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _klpforge klpforge
"""
