"""The stages of a request, one job each; ``gateway.pipeline.chain`` lists them in order."""

from gateway.pipeline.stages.arguments import Arguments, Body
from gateway.pipeline.stages.bridge import CallUpstream
from gateway.pipeline.stages.challenge import Challenge, OfferStage
from gateway.pipeline.stages.decode import DecodeAndBind
from gateway.pipeline.stages.exactly_once import ExactlyOnce, InFlight
from gateway.pipeline.stages.respond import Respond
from gateway.pipeline.stages.route import Route
from gateway.pipeline.stages.safety import (
    HeaderLimits,
    PayerChecks,
    PreChallengeSafety,
    Reserve,
)
from gateway.pipeline.stages.settle import Settle, SettleUpfront
from gateway.pipeline.stages.verify import PaymentWindow, Record, Verify

__all__ = [
    "Arguments",
    "Body",
    "CallUpstream",
    "Challenge",
    "DecodeAndBind",
    "ExactlyOnce",
    "HeaderLimits",
    "InFlight",
    "OfferStage",
    "PayerChecks",
    "PaymentWindow",
    "PreChallengeSafety",
    "Record",
    "Reserve",
    "Respond",
    "Route",
    "Settle",
    "SettleUpfront",
    "Verify",
]
