"""The Open Inference Protocol v2 gRPC service (`inference.GRPCInferenceService`) of an agent.

Any OIP v2 client (tritonclient.grpc, KServe's) works unchanged. Inference runs in the agent's
inference thread pool, never on the event loop: decode, registry.infer, encode in one hop.
Health and metadata only read the registry under its lock for a moment: they answer on the
event loop, so they never queue behind inference or deploys.
Errors are `mle_proto.errors` classes; the client sees their gRPC status and one-line message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Container, Iterable, Mapping
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from mle_agent.servicers import _unary
from mle_agent.serving.registry import InferRequest
from mle_agent.serving.tensors import decode_grpc_inputs, encode_grpc_outputs
from mle_proto import __version__
from mle_proto.errors import InvalidInput
from mle_proto.v1 import inference_pb2 as ipb
from mle_proto.v1 import inference_pb2_grpc as ipb_grpc

if TYPE_CHECKING:
    from mle_agent.serving.backend import TensorSpec
    from mle_agent.serving.registry import InferResult, ModelMetadata, ModelRegistry

__all__ = ["EXTENSIONS", "SERVER_NAME", "InferenceServicer", "parse_version", "requested_outputs"]

SERVER_NAME = "mle-agent"
_VERSION_DIGITS = 10  # versions are uint32 on the wire: 4294967295 has 10 digits
EXTENSIONS = ("binary_tensor_data",)
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class InferenceServicer(ipb_grpc.GRPCInferenceServiceServicer):
    """Health, metadata and inference over the registry's models."""

    def __init__(self, registry: ModelRegistry, executor: Executor) -> None:
        self._registry = registry
        self._executor = executor

    @_unary
    async def ServerLive(
        self, request: ipb.ServerLiveRequest, context: Context
    ) -> ipb.ServerLiveResponse:
        """Live while the process answers."""
        return ipb.ServerLiveResponse(live=True)

    @_unary
    async def ServerReady(
        self, request: ipb.ServerReadyRequest, context: Context
    ) -> ipb.ServerReadyResponse:
        """Ready when every routed version is loaded (so also with no model at all)."""
        return ipb.ServerReadyResponse(ready=self._registry.ready())

    @_unary
    async def ModelReady(
        self, request: ipb.ModelReadyRequest, context: Context
    ) -> ipb.ModelReadyResponse:
        """Whether a model (its route) or one version is loaded."""
        version = parse_version(request.version)
        return ipb.ModelReadyResponse(ready=self._registry.ready(_name(request.name), version))

    @_unary
    async def ServerMetadata(
        self, request: ipb.ServerMetadataRequest, context: Context
    ) -> ipb.ServerMetadataResponse:
        """Server name, version and protocol extensions."""
        return ipb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    @_unary
    async def ModelMetadata(
        self, request: ipb.ModelMetadataRequest, context: Context
    ) -> ipb.ModelMetadataResponse:
        """Versions, platform and tensor signature of a model or one version."""
        version = parse_version(request.version)
        return metadata_response(self._registry.metadata(_name(request.name), version))

    @_unary
    async def ModelInfer(
        self, request: ipb.ModelInferRequest, context: Context
    ) -> ipb.ModelInferResponse:
        """Run the model; the response names the version that answered."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._infer, request)

    def _infer(self, request: ipb.ModelInferRequest) -> ipb.ModelInferResponse:
        wanted = requested_outputs((o.name, o.parameters) for o in request.outputs)
        infer = InferRequest(
            model=_name(request.model_name),
            inputs=decode_grpc_inputs(request),
            version=parse_version(request.model_version),
            request_id=request.id,
            outputs=wanted,
        )
        result = self._registry.infer(infer)
        response = ipb.ModelInferResponse(
            model_name=result.model, model_version=str(result.version), id=request.id
        )
        for key, value in result.parameters.items():
            response.parameters[key].string_param = value
        encode_grpc_outputs(ordered_outputs(result, wanted), response)
        return response


def metadata_response(found: ModelMetadata) -> ipb.ModelMetadataResponse:
    """The gRPC ModelMetadata answer."""

    def tensors(specs: tuple[TensorSpec, ...]) -> list[ipb.ModelMetadataResponse.TensorMetadata]:
        return [
            ipb.ModelMetadataResponse.TensorMetadata(
                name=spec.name, datatype=spec.datatype, shape=spec.shape
            )
            for spec in specs
        ]

    return ipb.ModelMetadataResponse(
        name=found.name,
        versions=[str(v) for v in found.versions],
        platform=found.platform,
        inputs=tensors(found.inputs),
        outputs=tensors(found.outputs),
    )


def parse_version(text: str) -> int | None:
    """A request's model version: "" = the route decides, else a positive integer."""
    if not text:
        return None
    # Length first: int() refuses strings over 4300 digits with a ValueError of its own.
    if len(text) > _VERSION_DIGITS or not text.isascii() or not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"model version must be a positive integer, got {text[:40]!r}")
    return int(text)


def requested_outputs(outputs: Iterable[tuple[str, Container[str]]]) -> tuple[str, ...]:
    """Names of the outputs a request asks for, from (name, parameter names) pairs; () = all."""
    names: list[str] = []
    for name, parameters in outputs:
        if not name:
            raise InvalidInput("a requested output has no name")
        if name in names:
            raise InvalidInput(f"output {name} is requested twice")
        if "classification" in parameters:
            raise InvalidInput(f"output {name}: the classification extension is not supported")
        names.append(name)
    return tuple(names)


def ordered_outputs(result: InferResult, wanted: tuple[str, ...]) -> Mapping[str, Any]:
    """The result's outputs, in the order the request asked for them."""
    if not wanted:
        return result.outputs
    return {name: result.outputs[name] for name in wanted if name in result.outputs}


def _name(name: str) -> str:
    if not name:
        raise InvalidInput("model name is required")
    return name
