"""The gateway's errors: each message is a sentence a user can act on.

``RetryLater`` versus ``GiveUp`` says whether trying the same work again may succeed
(dramatiq's habit); the CLI maps ``GatewayError`` to a one-line message and an exit code.
"""


class GatewayError(Exception):
    """Base of every error the gateway reports to a user."""


class ConfigError(GatewayError):
    """The configuration file is missing, unreadable or invalid.

    ``problems`` holds one line per mistake, each ``key.path: reason, got value``.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class FastPathUnavailable(ConfigError):
    """pynetdicom lacks a private name the fast path replaces (``dimse.fence``): exit 2, one line."""


class RetryLater(GatewayError):
    """The work may succeed later (peer down, source series still arriving)."""


class GiveUp(GatewayError):
    """The work cannot succeed as it is; retrying the same input will fail again."""


class InvalidUID(GiveUp):
    """A UID is missing or not a valid DICOM UID."""


class UnreadableHeader(GiveUp):
    """A file is not a DICOM Part 10 file, or its file meta cannot be used."""


class PeerGone(RetryLater):
    """A DICOM peer aborted, asked to release or broke the protocol while we waited for it."""


class StorageFull(RetryLater):
    """The store is below its free-space floor or the disk is full."""


class JobError(GiveUp):
    """An inbox job is malformed; the message goes to failed/NAME.error.txt."""


class SourceNotFound(RetryLater):
    """An inbox job's source series has not been received (yet)."""


class UnknownDestination(GatewayError):
    """A destination name is not configured."""


class DataDirInUse(GatewayError):
    """Another ``run`` holds the data folder's lock."""


class AuthRefused(GiveUp):
    """A destination or its token endpoint refused our credentials; fix the secret, then retry."""
