"""The upstream room: the one place that calls an upstream (REST or SOAP), and its seam.

    bridge.py       ``Bridge``: one upstream request per paid call, retries, failover, failure rules
    transport.py    ``UpstreamClient`` (the seam), ``UpstreamResponse``, which headers may cross
    answers.py      retry timing and the common error model of a failed call
    failures.py     ``UpstreamFailure`` and the catalog's failure rules (an answer that is a failure)
    documents.py    exact-decimal JSON, JSON pointers, values of failure rules
    soap.py         SOAP envelopes from a WSDL operation, faults and results
    credentials.py  upstream credentials from the environment or secret files
"""

from gateway.upstream.bridge import Bridge, BridgeConfigError, UpstreamFailure
from gateway.upstream.credentials import Credentials, CredentialsError, resolve_credentials
from gateway.upstream.soap import SoapArgumentError, SoapDefinitionError
from gateway.upstream.transport import AiohttpUpstreamClient, UpstreamClient, UpstreamResponse, UpstreamUnreachable

__all__ = [
    "AiohttpUpstreamClient",
    "Bridge",
    "BridgeConfigError",
    "Credentials",
    "CredentialsError",
    "SoapArgumentError",
    "SoapDefinitionError",
    "UpstreamClient",
    "UpstreamFailure",
    "UpstreamResponse",
    "UpstreamUnreachable",
    "resolve_credentials",
]
