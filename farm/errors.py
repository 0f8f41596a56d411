"""The farm's exceptions. Retry decisions follow from the type.

FarmError
 ├── InvalidJob        bad input: refused before anything is stored; a worker never retries it
 │    ├── FarmNotRunning  no Redis configured and no `farm up` running on this machine
 │    └── PortInUse       a port the farm was asked to listen on is taken
 ├── JobNotFound       no record for that job id (never submitted, or expired)
 ├── TransientError    Redis, storage or device trouble that a retry may cure
 ├── StaleAttempt      a worker's write carried an attempt token that is no longer current
 ├── JobFailed         a job you waited on ended `failed`
 ├── JobCancelled      a job you waited on ended `cancelled`
 └── WaitTimeout       `wait` gave up before the job ended
"""

from __future__ import annotations

import errno


class FarmError(Exception):
    """Root of every error the farm raises on purpose."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id

    def __str__(self) -> str:
        msg = str(self.args[0]) if self.args else ""
        return f"job {self.job_id}: {msg}" if self.job_id else msg


class InvalidJob(FarmError, ValueError):
    """Bad input. `field` names what was wrong; the message names the value."""

    def __init__(
        self, message: str, *, field: str | None = None, job_id: str | None = None
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.field = field


class FarmNotRunning(InvalidJob):
    """No Redis is configured (`FARM_REDIS_URL`) and no embedded farm (`farm up`) runs here."""


class PortInUse(InvalidJob):
    """A port the farm was asked to listen on is taken: one line naming the address and how to
    choose another, instead of `[Errno 98] Address already in use`.

        >>> try:
        ...     server = ThreadingHTTPServer((host, port), Handler)
        ... except OSError as e:
        ...     PortInUse.check(e, "farm dashboard", host, port)   # re-raises as PortInUse
        ...     raise
    """

    def __init__(self, what: str, host: str, port: int, hint: str = "--port N") -> None:
        super().__init__(
            f"{what}: {host}:{port} is already in use (another farm, or another program); "
            f"choose another port with {hint} (0: any free port)",
            field="port",
        )

    @classmethod
    def check(cls, error: OSError, what: str, host: str, port: int, hint: str = "--port N") -> None:
        """Raise `PortInUse` for an `EADDRINUSE` error; any other `OSError` is the caller's."""
        if error.errno == errno.EADDRINUSE:
            raise cls(what, host, port, hint) from error


class JobNotFound(FarmError, KeyError):
    """No record for this job id."""


class TransientError(FarmError):
    """A failure that a retry may cure (connection lost, storage unavailable, out of memory)."""


class StaleAttempt(FarmError):
    """The writer's attempt token is no longer the job's current one (fencing)."""


class JobFailed(FarmError):
    """A waited-on job ended `failed`; the message is the recorded reason."""


class JobCancelled(FarmError):
    """A waited-on job ended `cancelled`."""


class WaitTimeout(FarmError, TimeoutError):
    """`wait` ran out of time before the job ended."""


EXIT_FAILED = 1
"""`farm` exits with this when a job it waited for did not succeed, or a check failed."""

EXIT_INVALID = 2
"""`farm` exits with this on bad input (`InvalidJob`): nothing was stored or enqueued."""

EXIT_UNAVAILABLE = 3
"""`farm` exits with this when Redis or storage could not be reached (`TransientError`): a
retry may succeed."""

EXIT_INTERRUPTED = 130
"""`farm` exits with this on Ctrl-C (128 + SIGINT, as shells report it)."""
