"""Every use of the SageMaker Python SDK's private API, in one place, so that an upgrade that
breaks one breaks here and in tests/test_third_party_adapters.py, which says which.

- ``ModelTrainer._create_training_job_args(boto3=True)``: the CreateTrainingJob request, built
  (and the code staged in S3) the way ``train()`` itself builds it, and SageMaker Pipelines
  too. ``train()`` would name the job ``{base_job_name}-{timestamp}``, and the pipeline needs
  one deterministic name per flow run to re-attach to its job instead of paying twice.
- ``ModelTrainer._resolve_staging_bucket()``: overridden so that the code is always staged in
  the session's bucket under our key prefix (see ``staging_in_own_bucket``).

The SDK is pinned below 4 (pyproject.toml); ``tests/test_aws_backend.py`` checks the request
field by field with botocore's Stubber.
"""

from __future__ import annotations

import functools
from typing import Any


def training_job_request(trainer: Any, input_data_config: list[Any]) -> dict[str, Any]:
    """The CreateTrainingJob request (boto3's field names) that ``trainer.train()`` would send
    for these channels; uploads the source code and the SDK's drivers on the way."""
    return trainer._create_training_job_args(input_data_config=input_data_config, boto3=True)


@functools.cache
def staging_in_own_bucket() -> type:
    """ModelTrainer, staging the code always in the session's bucket under the key prefix we
    give it. The SDK otherwise asks IAM (SimulatePrincipalPolicy) whether the role may write
    anywhere in that bucket and, when the answer is no (the least-privilege role may write only
    under the pipeline's prefix), stages under the output path's prefix *and* ours:
    PREFIX/training-jobs/PREFIX/training-jobs/JOB/..."""
    from sagemaker.train import ModelTrainer

    class PipelineModelTrainer(ModelTrainer):
        def _resolve_staging_bucket(self) -> tuple[str, None]:
            return self.sagemaker_session.default_bucket(), None

    return PipelineModelTrainer
