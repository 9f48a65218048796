"""Which destinations an instance goes to: pure matching of rules over its stored header.

A rule's ``match`` holds conditions that must all hold (AND); a condition listing several
values holds when any of them does (OR). ``tags`` compares the header's value of a DICOM
keyword with glob patterns (``*``, ``?``, ``[...]``), case-insensitively; a multi-valued
element is compared as its values joined by a backslash, an absent one as the empty text.
Nothing here reads files or pixel data: the caller passes the header (the elements before
Pixel Data) and what the network side knows (calling and called AE title).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.routing.settings import MatchConfig, RuleConfig


@dataclass(frozen=True)
class Facts:
    """What matching looks at, besides the header: who sent the instance, to whom."""

    calling_ae_title: str | None = None  # None: not received over DIMSE (send, STOW-RS, derived)
    called_ae_title: str | None = None


@dataclass(frozen=True)
class Verdict:
    """One rule's answer for one instance: matched, or the first condition that failed."""

    rule: str
    matched: bool
    reason: str = ""  # empty when matched; else e.g. "modality is 'MR', not one of CT"


@dataclass(frozen=True)
class Decision:
    """Where one instance goes and why (the union of ``received`` and every matching rule)."""

    destinations: tuple[str, ...]
    rules: tuple[str, ...]  # names of the rules that matched, in config order
    verdicts: tuple[Verdict, ...]
    received: bool  # routes.received contributed

    def describe(self, sop_instance_uid: str, base: str = "received") -> str:
        """The one log line per routing decision (``base``: what ``received`` stood for)."""
        why = [f"rules {', '.join(self.rules)}"] if self.rules else []
        if self.received:
            why.append(base)
        if not self.destinations:
            return f"routed SOP {sop_instance_uid} to no destination (no rule matched)"
        return f"routed SOP {sop_instance_uid} to {', '.join(self.destinations)} by {', '.join(why)}"


def element_text(header: Dataset, keyword: str) -> str | None:
    """The header's value of ``keyword`` as text (multi-values joined by ``\\``); None if absent."""
    if keyword not in header:
        return None
    value = header[keyword].value
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    return str(value)


def _quote(value: str | None) -> str:
    return "absent" if value is None else repr(value)


def _one_of(values: Sequence[str]) -> str:
    return ", ".join(values)


def check(match: MatchConfig, header: Dataset, facts: Facts) -> str:
    """Empty when every condition holds; else the first failed condition with the value found."""
    if match.calling_ae_title is not None and facts.calling_ae_title not in match.calling_ae_title:
        got = facts.calling_ae_title
        return (f"calling_ae_title is {_quote(got)}"
                + (" (not received over DIMSE)" if got is None else "")
                + f", not one of {_one_of(match.calling_ae_title)}")
    if match.called_ae_title is not None and facts.called_ae_title not in match.called_ae_title:
        got = facts.called_ae_title
        return (f"called_ae_title is {_quote(got)}"
                + (" (not received over DIMSE)" if got is None else "")
                + f", not one of {_one_of(match.called_ae_title)}")
    if match.modality is not None:
        got = element_text(header, "Modality")
        if got is None or got.strip() not in match.modality:
            return f"modality is {_quote(got)}, not one of {_one_of(match.modality)}"
    if match.sop_class_uid is not None:
        got = element_text(header, "SOPClassUID")
        if got is None or got.strip("\0 ") not in match.sop_class_uid:
            return f"sop_class_uid is {_quote(got)}, not one of {_one_of(match.sop_class_uid)}"
    for keyword, patterns in (match.tags or {}).items():
        got = element_text(header, keyword)
        text = (got or "").strip().casefold()
        if not any(fnmatchcase(text, p.casefold()) for p in patterns):
            wanted = " or ".join(repr(p) for p in patterns)
            return f"tags.{keyword} is {_quote(got)}, which does not match {wanted}"
    return ""


def evaluate(rules: Iterable[RuleConfig], header: Dataset, facts: Facts) -> list[Verdict]:
    """Every rule's verdict for one instance, in config order."""
    verdicts = []
    for rule in rules:
        reason = check(rule.match, header, facts)
        verdicts.append(Verdict(rule.name, not reason, reason))
    return verdicts


def decide(
    rules: Sequence[RuleConfig], received: Sequence[str], header: Dataset, facts: Facts
) -> Decision:
    """Destinations for a received instance: ``received`` plus every matching rule's, each once."""
    verdicts = evaluate(rules, header, facts)
    by_name = {rule.name: rule for rule in rules}
    matched = [v.rule for v in verdicts if v.matched]
    chosen = [dest for name in matched for dest in by_name[name].destinations]
    destinations = list(dict.fromkeys([*chosen, *received]))
    return Decision(tuple(destinations), tuple(matched), tuple(verdicts), bool(received))
