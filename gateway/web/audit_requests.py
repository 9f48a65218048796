"""One audit message per DICOMweb request: who, from where, what was searched, retrieved or stored, the status.

A pure-ASGI layer (bodies stay streamed); the trail comes through ``Deps.extras["audit"]``
(``service.run`` puts it there), so apps built without one audit nothing.
"""

from __future__ import annotations

import logging
import sqlite3
from urllib.parse import unquote

from anyio import CancelScope, to_thread

from gateway import audit as audit_trail
from gateway.storage import qido

log = logging.getLogger("gateway.audit")

PREFIX = "/dicom-web/"
_QUERY_LEVELS = ("studies", "series", "instances")


def _outcome(status: int) -> int:
    if status < 400:
        return audit_trail.Outcome.SUCCESS
    if status < 500:
        return audit_trail.Outcome.MINOR_FAILURE
    return audit_trail.Outcome.SERIOUS_FAILURE


def retrieved_study(method: str, path: str, status: int) -> str | None:
    """The study a successful WADO-RS request retrieved from (its patient is looked up), or None."""
    parts = [unquote(p) for p in path[len(PREFIX):].split("/") if p]
    if method == "GET" and status < 400 and len(parts) >= 2 and parts[0] == "studies" \
            and parts[-1] not in _QUERY_LEVELS:
        return parts[1]
    return None


def describe(method: str, path: str, query: str, status: int, identity: str, address: str | None,
             node_ae: str, patient_id: str | None = None, stored: list[dict] | None = None) -> dict:
    """``AuditLog.record`` arguments for one request (pure); ``patient_id``: of a retrieved study;
    ``stored``: the study and patient objects of what a STOW-RS request stored."""
    parts = [unquote(p) for p in path[len(PREFIX):].split("/") if p]
    participants = [
        audit_trail.participant(identity or "-", requestor=True, address=address,
                                role=audit_trail.SOURCE_ROLE if method == "POST" else audit_trail.DESTINATION_ROLE),
        audit_trail.participant(node_ae, requestor=False,
                                role=audit_trail.DESTINATION_ROLE if method == "POST" else audit_trail.SOURCE_ROLE),
    ]
    description = f"HTTP {status} {method} {path}"
    if status in (401, 403):
        return dict(event_id=audit_trail.USER_AUTHENTICATION, outcome=_outcome(status),
                    type_codes=(audit_trail.LOGIN,), description=description, participants=participants)
    if method == "GET" and parts and parts[-1] in _QUERY_LEVELS:  # QIDO-RS
        scope = "/".join(parts)
        obj = {"ParticipantObjectID": scope, "ParticipantObjectTypeCode": 2,
               "ParticipantObjectTypeCodeRole": 3,
               "ParticipantObjectIDTypeCode": {"csd-code": "110181", "codeSystemName": "DCM",
                                               "originalText": "SOP Class UID"},
               "ParticipantObjectQuery": f"{path}?{query}" if query else path}
        return dict(event_id=audit_trail.QUERY, outcome=_outcome(status), action=audit_trail.EXECUTE,
                    description=description, participants=participants, objects=[obj])
    objects = []
    if len(parts) >= 2 and parts[0] == "studies":
        obj = audit_trail.study_object(parts[1])
        detail = {"Resource": "/".join(parts)}  # series, instance, frames, metadata: what was asked for
        if len(parts) >= 4 and parts[2] == "series":
            detail["SeriesInstanceUID"] = parts[3]
        if len(parts) >= 6 and parts[4] == "instances":
            detail["SOPInstanceUID"] = parts[5]
        obj["ParticipantObjectDescription"] = detail
        objects.append(obj)
        if patient_id:
            objects.append(audit_trail.patient_object(patient_id))
    if method == "POST" and stored:
        objects = list(stored)  # what was stored, counted (the URL's study is among them)
    action = audit_trail.CREATE if method == "POST" else audit_trail.READ
    return dict(event_id=audit_trail.INSTANCES_TRANSFERRED, outcome=_outcome(status), action=action,
                description=description, participants=participants, objects=objects)


class AuditRequests:
    """Records each request under /dicom-web/ once its response has started (status known)."""

    def __init__(self, app, deps):
        self.app = app
        self.deps = deps

    async def __call__(self, scope, receive, send):
        audit = self.deps.extras.get("audit") if scope["type"] == "http" else None
        path = scope.get("path", "") if audit is not None else ""
        if not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        seen = {"status": 500}

        async def watched(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            client = scope.get("client")
            state = scope.get("state") or {}
            identity = state.get("identity") or "-"
            method = scope.get("method", "GET")
            study = retrieved_study(method, path, seen["status"])
            patient = None
            if study:
                with CancelScope(shield=True):  # a client gone mid-response still gets its line
                    patient = await to_thread.run_sync(self._patient, study)
            args = describe(method, path, scope.get("query_string", b"").decode(
                "latin-1"), seen["status"], identity, client[0] if client else None,
                self.deps.config.node.ae_title, patient, state.get("audit_objects"))
            audit.record(args.pop("event_id"), args.pop("outcome"), **args)

    def _patient(self, study_uid: str) -> str | None:
        """The retrieved study's Patient ID from the index (one indexed lookup, off the event loop)."""
        try:
            with self.deps.reader() as conn:
                return qido.patient_of_study(conn, study_uid)
        except sqlite3.Error as exc:
            log.warning("audit: cannot look up the patient of study %s: %s", study_uid, exc)
            return None
