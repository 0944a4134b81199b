"""Sphinx directives that build pages of the payne_lite docs from the code itself.

``payne-api MODULE``
    The module's docstring and every name of its ``__all__`` (autodoc), except the
    objects that ``payne_lite`` itself exports: those are documented once, on the
    top-level page, and listed here with a link. So each object has one entry and
    the pages follow ``__all__`` as it changes.

``qa-bits``
    The QA bitmask table of the ``flags`` column, made from
    :data:`payne_lite.fitting.FLAG_BITS`, the ``FLAG_*`` constants and the thresholds
    they name, so the page cannot drift from the code.
"""

from __future__ import annotations

import importlib
import re

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _parse(directive: SphinxDirective, lines: list[str]) -> list[nodes.Node]:
    node = nodes.container()
    source = directive.get_source_info()[0]
    if type(directive.state).__module__.startswith("myst_parser"):
        # in a Markdown page nested content is parsed as Markdown: fence the reST
        lines = ["```{eval-rst}", *lines, "```"]
    directive.state.nested_parse(StringList(lines, source=source), 0, node)
    return node.children


def top_level_exports() -> dict[int, str]:
    """id(object) -> its name in ``payne_lite.__all__``."""
    import payne_lite

    return {id(getattr(payne_lite, n)): n for n in payne_lite.__all__}


def api_lines(modname: str) -> list[str]:
    """reST for one module's API page (see the module docstring)."""
    mod = importlib.import_module(modname)
    names = list(getattr(mod, "__all__", []))
    top = top_level_exports() if modname != "payne_lite" else {}
    shared = [n for n in names if id(getattr(mod, n)) in top]
    # modules in __all__ get pages of their own
    skip = shared + [n for n in names if type(getattr(mod, n)).__name__ == "module"]
    lines = [f".. automodule:: {modname}", "   :members:", "   :imported-members:"]
    if skip:
        lines.append("   :exclude-members: " + ", ".join(skip))
    lines.append("")
    if shared:
        refs = ", ".join(
            f":py:obj:`{n} <payne_lite.{top[id(getattr(mod, n))]}>`" for n in shared
        )
        lines += [
            f"Also exported by ``{modname}``, documented on the top-level page "
            f"(``payne_lite.<name>``): {refs}.",
            "",
        ]
    return lines


class PayneAPI(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self):
        return _parse(self, api_lines(self.arguments[0]))


#: constants named in FLAG_BITS texts, shown with their values
THRESHOLDS = (
    "LOW_SNR",
    "MDN_FLAG_NSIGMA",
    "POOR_FIT_NSIGMA",
    "POOR_FIT_MISFIT",
    "POOR_FACTOR",
    "POOR_MIN_COUNT",
    "DIP_FALSE_ALARM",
)


def qa_bit_lines() -> list[str]:
    """reST list-table of the QA bits, and one of the thresholds they use."""
    from payne_lite.fitting import _schema as s

    consts = {
        getattr(s, n): n for n in dir(s) if n.startswith("FLAG_") and n != "FLAG_BITS"
    }
    lines = [
        ".. list-table:: QA bits of the ``flags`` column (from ``payne_lite.fitting.FLAG_BITS``)",
        "   :header-rows: 1",
        "   :widths: 6 8 22 64",
        "",
        "   * - bit",
        "     - value",
        "     - constant",
        "     - meaning",
    ]
    for bit, text in sorted(s.FLAG_BITS.items()):
        value = 1 << bit
        text = text.replace("|", "\\|")  # |flux| is no reST substitution
        text = re.sub(r"\b(" + "|".join(THRESHOLDS) + r")\b", r"``\1``", text)
        lines += [
            f"   * - {bit}",
            f"     - {value}",
            f"     - ``{consts.get(value, '')}``",
            f"     - {text}",
        ]
    lines += [
        "",
        ".. list-table:: Thresholds (``payne_lite.fitting._schema``)",
        "   :header-rows: 1",
        "   :widths: 30 70",
        "",
        "   * - constant",
        "     - value",
    ]
    for name in THRESHOLDS:
        lines += [f"   * - ``{name}``", f"     - {getattr(s, name)!r}"]
    limits = ", ".join(f"{k.name}: {v:g}" for k, v in s.COND_LIMIT.items())
    lines += ["   * - ``COND_LIMIT`` (bit 3)", f"     - {limits}", ""]
    return lines


class QABits(SphinxDirective):
    has_content = False

    def run(self):
        return _parse(self, qa_bit_lines())


def setup(app):
    app.add_directive("payne-api", PayneAPI)
    app.add_directive("qa-bits", QABits)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
