"""Every use of boto3's private API, in one place, so that an upgrade that breaks one breaks
here and in tests/test_third_party_adapters.py, which says which.

boto3 exposes no public accessor for the botocore session under a ``boto3.Session`` that
someone else built (a Prefect AwsCredentials block's); the backend needs it to share one
service-model loader across sessions.
"""

from __future__ import annotations

import boto3
import botocore.session


def botocore_session_of(session: boto3.Session) -> botocore.session.Session:
    """The botocore session under a boto3 session (``Session._session``, boto3 1.x)."""
    return session._session
