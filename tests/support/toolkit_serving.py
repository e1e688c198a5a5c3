"""Serves requests through SageMaker's own PyTorch inference toolkit, as inside AWS's PyTorch
serving container, without its model server: the toolkit's ``HandlerService`` (and the
``Transformer`` under it) imports the handlers from ``<model_dir>/code`` (``SAGEMAKER_PROGRAM``,
else ``inference.py``) and handles each request the way TorchServe calls it.

Run as a script in a process of its own, with ``<model_dir>/code`` on PYTHONPATH (the
container's set-up) and the container environment::

    python tests/support/toolkit_serving.py MODEL_DIR REQUESTS.json ANSWERS.json

REQUESTS: a list of {"body_file", "content_type", "accept"}; ANSWERS: for each, {"status",
"content_type", "body_file"} (the body written beside ANSWERS.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Request:
    """What TorchServe's request processor exposes: the request's headers."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def get_request_properties(self) -> dict[str, str]:
        return self.headers


class Context:
    """The parts of the model server's context the toolkit uses."""

    def __init__(self, model_dir: str, headers: dict[str, str]) -> None:
        self.system_properties = {"model_dir": model_dir, "gpu_id": None}
        self.request_processor = [Request(headers)]
        self.status = 200
        self.content_type: str | None = None

    def set_response_content_type(self, index: int, value: str) -> None:
        self.content_type = value

    def set_response_status(self, code: int, phrase: str = "") -> None:
        self.status = code


def main(model_dir: str, requests_path: str, answers_path: str) -> None:
    from sagemaker_pytorch_serving_container.handler_service import HandlerService

    service = HandlerService()
    service.initialize(Context(model_dir, {}))
    out = Path(answers_path).parent
    answers = []
    for i, request in enumerate(json.loads(Path(requests_path).read_text())):
        headers = {"Content-Type": request["content_type"]}
        if request.get("accept"):
            headers["Accept"] = request["accept"]
        context = Context(model_dir, headers)
        body = Path(request["body_file"]).read_bytes()
        [response] = service.handle([{"body": body}], context)
        if isinstance(response, str):
            response = response.encode()
        body_file = out / f"answer-{i}"
        body_file.write_bytes(response)
        answers.append({"status": context.status, "content_type": context.content_type,
                        "body_file": str(body_file)})
    Path(answers_path).write_text(json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:4])
