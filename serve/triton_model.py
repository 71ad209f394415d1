"""A btp artifact as a Triton Inference Server Python-backend model (written by `btp-serve --export-triton` as
`REPO/NAME/1/model.py`; the artifact sits beside it in `1/artifact/`). Needs btp installed in the Python that
Triton's Python stub runs. Inputs and outputs: see `btp.serve.triton`."""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from btp.runtime import Pipeline
from btp.serve.protocol import Limits
from btp.serve.triton import INPUTS, answer_requests


class TritonPythonModel:
    """Triton's Python-backend interface: `initialize` loads the artifact, `execute` answers a batch."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        root = Path(args["model_repository"]) / str(args["model_version"])
        self.pipe = Pipeline.load(root / params.get("artifact", "artifact"), threads=int(params.get("threads", 0)))
        self.limits = Limits(max_tokens=self.pipe.manifest.build.max_new_tokens)

    def execute(self, requests):
        arrays = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name, _ in INPUTS}
                  for r in requests]
        responses = []
        for answer in answer_requests(self.pipe, arrays, self.limits):
            if isinstance(answer, Exception):
                error = pb_utils.TritonError(str(answer), pb_utils.TritonError.INVALID_ARG)  # HTTP 400
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                tensors = [pb_utils.Tensor(name, array) for name, array in answer.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
