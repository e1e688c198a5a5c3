"""Follows a SageMaker training job's CloudWatch log streams (one per instance,
``{job}/algo-N-{epoch}``) and forwards each new line to the backend's log callback."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from backends.aws.errors import ACCESS_DENIED_CODES, error_code, translate
from backends.base import LogCallback

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
MAX_PAGES_PER_POLL = 100  # a stream's backlog is read over several polls, never unboundedly


class TrainingLogTail:
    """Forwards new lines on each ``poll``. Following the log never fails the training task:
    the job's status decides. A missing permission switches it off (said once); anything
    else that outlives botocore's own retries (throttling, a timeout, a dropped connection)
    skips a growing number of polls, then resumes where it stopped."""

    MAX_BACKOFF_POLLS = 8

    def __init__(self, logs: Any, job_name: str, emit: LogCallback,
                 label_hosts: bool = False) -> None:
        self.logs = logs
        self.job_name = job_name
        self.emit = emit
        self.label_hosts = label_hosts  # several instances: "[algo-2] line", as locally
        self.tokens: dict[str, str | None] = {}
        self.disabled = False
        self.skip = 0  # polls to skip before trying again
        self.failures = 0  # in a row

    def poll(self, final: bool = False) -> int:
        """Forwards the events written since the last poll; returns how many. A missing log
        group or stream is no error: they appear when the instances start. ``final``: the job
        has ended, read now even while backing off."""
        if self.disabled:
            return 0
        if self.skip and not final:
            self.skip -= 1
            return 0
        try:
            count = sum(self._read_stream(name) for name in self._streams())
        except ClientError as e:
            if error_code(e) == "ResourceNotFoundException":
                return 0
            if error_code(e) in ACCESS_DENIED_CODES:
                # Logs are a convenience: without logs:GetLogEvents the job still runs, so say
                # so once and keep waiting for it.
                self.disabled = True
                self.emit(f"(not following the job's CloudWatch logs: "
                          f"{translate(e, 'reading ' + LOG_GROUP)})")
                return 0
            return self._back_off(f"{error_code(e)}: {e}")
        except BotoCoreError as e:  # timeouts and connection errors, after botocore's retries
            return self._back_off(f"{type(e).__name__}: {e}")
        if self.failures:
            self.emit("(following the job's CloudWatch logs again)")
        self.failures = 0
        return count

    def _back_off(self, reason: str) -> int:
        if not self.failures:
            self.emit(f"(the job's CloudWatch logs did not answer, {reason}; trying again "
                      f"later, no line is lost)")
        self.failures += 1
        self.skip = min(2 ** self.failures - 1, self.MAX_BACKOFF_POLLS)
        return 0

    def _streams(self) -> list[str]:
        names: list[str] = []
        paginator = self.logs.get_paginator("describe_log_streams")
        for page in paginator.paginate(logGroupName=LOG_GROUP,
                                       logStreamNamePrefix=f"{self.job_name}/"):
            names += [s["logStreamName"] for s in page.get("logStreams", [])]
        return sorted(names)

    def _read_stream(self, stream: str) -> int:
        label = ""
        if self.label_hosts:
            host = stream.split("/", 1)[-1].rsplit("-", 1)[0]  # job/algo-2-1700000000
            label = f"[{host}] "
        count = 0
        token = self.tokens.get(stream)
        for _ in range(MAX_PAGES_PER_POLL):
            kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": stream,
                                      "startFromHead": True}
            if token:
                kwargs["nextToken"] = token
            response = self.logs.get_log_events(**kwargs)
            for event in response.get("events", []):
                self.emit(label + event["message"].rstrip("\n"))
                count += 1
            new_token = response.get("nextForwardToken")
            # CloudWatch returns the token it was given at the end of the stream; pages may
            # be empty before that, so only an unchanged token means "caught up".
            if new_token is None or new_token == token:
                break
            token = self.tokens[stream] = new_token  # kept per page: a failure loses nothing
        return count

