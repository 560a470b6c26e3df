"""`mle predict`: one Open Inference Protocol v2 call to a served model, over gRPC."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_cli.models._client import open_client
from mle_cli.models.inputs import DATATYPES, TensorInfo, fit_inputs, read_inputs, require_numpy
from mle_cli.settings import Settings
from mle_cli.targets import Endpoint, resolve_target
from mle_proto.errors import InvalidInput
from mle_proto.v1 import inference_pb2 as oip

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.generic]

__all__ = ["Prediction", "classes", "infer_request", "predict", "reply_outputs"]

# Which typed `contents` field carries each numpy dtype when an agent does not answer raw bytes.
_CONTENTS = {
    "bool": "bool_contents",
    "int8": "int_contents",
    "int16": "int_contents",
    "int32": "int_contents",
    "int64": "int64_contents",
    "uint8": "uint_contents",
    "uint16": "uint_contents",
    "uint32": "uint_contents",
    "uint64": "uint64_contents",
    "float32": "fp32_contents",
    "float64": "fp64_contents",
}


@dataclass(frozen=True)
class Prediction:
    """A model's answer and which version gave it."""

    target: str
    model: str
    version: str
    outputs: dict[str, Array]
    datatypes: dict[str, str]
    parameters: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: model, version (a number when it is one), outputs as nested lists."""
        version: int | str = int(self.version) if self.version.isdigit() else self.version
        outputs = {name: array.tolist() for name, array in self.outputs.items()}
        return {"model": self.model, "version": version, "outputs": outputs}


def predict(
    settings: Settings, name: str, target: str, input_path: Path, version: int = 0
) -> Prediction:
    """Send the input file to a served model (version 0: the route decides); return its answer."""
    arrays = read_inputs(input_path)
    endpoint = resolve_target(target, settings)
    return asyncio.run(_predict(endpoint, settings, name, version, arrays))


def classes(array: Array) -> list[int] | None:
    """The argmax per row of a classifier-looking output ([N, C] floats, C > 1), else None."""
    if array.ndim != 2 or array.shape[1] < 2 or array.dtype.kind != "f":
        return None
    return [int(i) for i in array.argmax(axis=1)]


async def _predict(
    endpoint: Endpoint, settings: Settings, name: str, version: int, arrays: Mapping[str, Array]
) -> Prediction:
    wanted = str(version) if version else ""
    async with open_client(endpoint, settings.rpc_timeout) as client:
        metadata = await client.metadata(name, wanted)
        specs = [TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs]
        request = infer_request(name, wanted, fit_inputs(arrays, specs))
        reply = await client.infer(request)
    return Prediction(
        target=client.target,
        model=reply.model_name or name,
        version=reply.model_version,
        outputs=reply_outputs(reply),
        datatypes={o.name: o.datatype for o in reply.outputs},
        parameters={k: _parameter(v) for k, v in reply.parameters.items()},
    )


def infer_request(name: str, version: str, inputs: Mapping[str, Array]) -> oip.ModelInferRequest:
    dtypes = {numpy_name: oip_name for oip_name, numpy_name in DATATYPES.items()}
    request = oip.ModelInferRequest(model_name=name, model_version=version, id=uuid.uuid4().hex)
    for input_name, array in inputs.items():
        request.inputs.add(name=input_name, datatype=dtypes[array.dtype.name], shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def reply_outputs(reply: oip.ModelInferResponse) -> dict[str, Array]:
    np = require_numpy()
    outputs = {}
    for i, tensor in enumerate(reply.outputs):
        dtype_name = DATATYPES.get(tensor.datatype)
        if dtype_name is None:
            raise InvalidInput(f"output {tensor.name!r} is {tensor.datatype}: not a number type")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        if i < len(reply.raw_output_contents):
            flat = np.frombuffer(reply.raw_output_contents[i], dtype=dtype)
        elif dtype_name in _CONTENTS:
            flat = np.asarray(getattr(tensor.contents, _CONTENTS[dtype_name]), dtype=dtype)
        else:  # FP16 has no typed field: the protocol sends it raw only
            raise InvalidInput(
                f"output {tensor.name!r}: {tensor.datatype} values sent without raw bytes"
            )
        try:
            outputs[tensor.name] = flat.reshape(tuple(tensor.shape))
        except ValueError:
            raise InvalidInput(
                f"output {tensor.name!r}: {flat.size} values do not fill shape {list(tensor.shape)}"
            ) from None
    return outputs


def _parameter(value: oip.InferParameter) -> str:
    choice = value.WhichOneof("parameter_choice")
    return "" if choice is None else str(getattr(value, choice))
