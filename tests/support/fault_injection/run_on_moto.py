"""Runs the pipeline on the AWS backend in a process of its own, so that a test can kill it:
against moto's server (which the test runs, reached through AWS_ENDPOINT_URL in this process's
environment) with the stand-in for SageMaker's data plane (``tests/support/aws_fakes.py``). The
stand-in's model servers start in sessions of their own, so, like real endpoints, they outlive
this process.

    python tests/support/fault_injection/run_on_moto.py SETTINGS.json

SETTINGS: ``moto_url``; ``stand_in_root``; the trained model as ``model_tar`` (a path),
``metrics`` and ``log_lines``; ``config``, the flow's parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(settings_path: str) -> int:
    settings = json.loads(Path(settings_path).read_text())
    url = settings["moto_url"]

    from sagemaker.core.helper import session_helper

    import backends.aws.session
    from flows.config import PipelineConfig
    from flows.pipeline import cifar10_pipeline
    from tests.support.aws_fakes import MotoAccount, SageMakerStandIn, TrainedModel

    # The same shims as the moto_server and sagemaker_stand_in fixtures, in this process.
    session_helper.sts_regional_endpoint = lambda region: url
    model = TrainedModel(Path(settings["model_tar"]).read_bytes(), settings["metrics"],
                         settings["log_lines"])
    stand_in = SageMakerStandIn(MotoAccount(url), model, Path(settings["stand_in_root"]))
    make = backends.aws.session.new_boto_session

    def session_with_stand_in(region: str | None):
        session = make(region)
        stand_in.attach(session)
        return session

    backends.aws.session.new_boto_session = session_with_stand_in
    state = cifar10_pipeline(PipelineConfig.model_validate(settings["config"]),
                             return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
