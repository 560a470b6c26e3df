"""An MLServer runtime serving an ONNX model with onnxruntime: the peer of bench/serving.py.

MLServer has no maintained ONNX runtime of its own, so this is the smallest custom runtime its
documentation describes (an `MLModel` with `load` and `predict`, codecs from `mlserver.codecs`).
It runs in the peers venv (scripts/peers.sh), loaded by `mlserver start` from a model folder whose
model-settings.json names `mlserver_onnx.OnnxModel` and the model file in `parameters.uri`.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    """One ONNX model: every input decoded with NumpyCodec, every output encoded back."""

    async def load(self) -> bool:
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feed)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(n, r) for n, r in zip(self._outputs, results, strict=True)
            ],
        )
