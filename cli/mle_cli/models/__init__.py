"""Serving models on agents from the operator's side: deploy, route, list, predict.

    deploy     ship a model file and serve it, or change a served model's route (`mle deploy`)
    routes     route planning from the current route and the operator's change (pure)
    listing    models, versions, traffic and live stats of each agent (`mle models`)
    predict    one Open Inference Protocol v2 call (`mle predict`)
    inputs     input files (.npy, .npz, .json) fitted to a model's inputs
    views      what those commands print

Imported only inside command bodies: it pulls in grpc (and numpy for predictions).
"""

from __future__ import annotations

from mle_cli.models.deploy import DeployOptions, DeployOutcome, default_name, deploy_model
from mle_cli.models.listing import Listing, list_models
from mle_cli.models.predict import Prediction, predict
from mle_cli.models.routes import RouteChange, RouteSpec

__all__ = [
    "DeployOptions",
    "DeployOutcome",
    "Listing",
    "Prediction",
    "RouteChange",
    "RouteSpec",
    "default_name",
    "deploy_model",
    "list_models",
    "predict",
]
