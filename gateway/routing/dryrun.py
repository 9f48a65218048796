"""``dicom-gateway route FILE_OR_FOLDER...``: what the rules and triggers would do, without a daemon.

Reads each file's header (never its pixel data), evaluates every rule and trigger as the
running gateway would for an instance received over DIMSE from ``calling_ae`` to
``called_ae``, and says which match, which do not and why, and where the instance would go.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Config
from gateway.errors import UnreadableHeader
from gateway.routing.rules import Facts, check, decide, element_text
from gateway.storage.header import read_header
from gateway.storage.sendfiles import files_under


@dataclass
class DryRun:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: int = 0


def explain(config: Config, paths: Iterable[Path], calling_ae: str | None, called_ae: str | None) -> DryRun:
    """Evaluate the configured rules and triggers on each DICOM file under ``paths``."""
    report = DryRun()
    facts = Facts(calling_ae_title=calling_ae, called_ae_title=called_ae)
    rules = config.routes.rules
    for path in files_under(paths, report.problems):
        try:
            header = read_header(path).dataset
        except (UnreadableHeader, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            report.problems.append(f"{path}: skipped, not a readable DICOM file ({exc})")
            continue
        report.files += 1
        sop = element_text(header, "SOPInstanceUID") or "(no SOP Instance UID)"
        modality = element_text(header, "Modality") or "no modality"
        report.lines.append(f"{path}: SOP {sop} ({modality})")
        decision = decide(rules, config.routes.received, header, facts)
        by_name = {r.name: r for r in rules}
        for verdict in decision.verdicts:
            if verdict.matched:
                dests = ", ".join(by_name[verdict.rule].destinations)
                report.lines.append(f"  rule {verdict.rule}: matches -> {dests}")
            else:
                report.lines.append(f"  rule {verdict.rule}: no match, {verdict.reason}")
        for trigger in config.triggers:
            reason = check(trigger.match, header, facts)
            if reason:
                report.lines.append(f"  trigger {trigger.name}: no match, {reason}")
            else:
                report.lines.append(
                    f"  trigger {trigger.name}: matches -> series exported to {trigger.export_dir} "
                    "when complete"
                )
        if decision.destinations:
            why = [f"rules {', '.join(decision.rules)}"] if decision.rules else []
            if decision.received:
                why.append("routes.received")
            report.lines.append(f"  destinations: {', '.join(decision.destinations)} (by {', '.join(why)})")
        else:
            report.lines.append("  destinations: none (no rule matched and routes.received is empty)")
    return report
