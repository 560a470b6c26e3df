"""Model serving on the agent: repository, runtimes, routing, batching, stats, OIP v2 front-ends.

numpy and the runtimes (onnxruntime, LiteRT) are optional extras: nothing here imports them at
module import time of `mle_agent`, so an agent without them still runs tasks and says, on a deploy,
which extra to install.

    backend      the Backend protocol every runtime adapter implements, tensor specs, datatypes
    onnx         onnxruntime adapter            litert    LiteRT / tflite-runtime / tf.lite adapter
    validation   digest, format magic, signature checks; the child-process load check
    repository   models/<name>/<version>/ on disk: model file + manifest.json, route.json
    registry     ModelRegistry: deploy, route, undeploy, infer, status (thread-safe)
    state        ModelState (one model's versions and route) and its ModelStatus message
    deploying    the deploy checks, then loading and switching
    loaded       one loaded version: in-flight leases, input checks, its batcher
    restoring    the models on disk back after a restart, checked, in the background
    calls        InferRequest, InferResult, ModelMetadata: what front-ends ask and get back
    dispatch     plans a request under the registry lock and runs the route's policy
    routing      routes: split (sticky), shadow, fallback, consensus; their validation
    policies     running fallback, consensus and the shadow mirror
    batching     dynamic batching per version
    stats        per-version counters and latency histograms; Prometheus exposition
    servicer     the mle.v1.Models gRPC servicer
    oip_grpc     inference.GRPCInferenceService servicer
    tensors      numpy <-> OIP tensors (typed contents, raw contents, JSON, binary extension)
    httpd        a small HTTP/1.1 server on asyncio streams, used by oip_http
    oip_http     OIP v2 REST routes and /metrics
"""
