"""The broker's four gRPC services, one module per token role, and their registration.

- `broker.services.base`: the shared core (`Broker`: store, files, CA, metrics; the `rpc` wrapper that turns
  refusals into status codes; request decoding);
- `broker.services.user`, `.agent`, `.job`, `.admin`: one servicer each, importing only the base (and admin the
  user service's listing);
- this module: `add_servicers`, which the server calls.

Imports point one way: the servicers import the base, this module imports the servicers, nothing imports back.
"""

from __future__ import annotations

import grpc

from broker.services.admin import AdminServicer
from broker.services.agent import AgentServicer
from broker.services.base import _HANDLERS, Broker, _deserializer
from broker.services.job import JobServicer
from broker.services.user import UserServicer
from splitpilot.broker.v1 import broker_pb2 as pb


def add_servicers(server, broker: Broker) -> None:
    """Register the four services on a grpc.aio server, as the generated add_*_to_server functions do, but
    with deserializers that hand an undecodable request to the handler (see `Undecodable`)."""
    for servicer in (UserServicer(broker), AgentServicer(broker), JobServicer(broker), AdminServicer(broker)):
        service = pb.DESCRIPTOR.services_by_name[_service_name(servicer)]
        handlers = {}
        for method in service.methods:
            make = _HANDLERS[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = make(
                getattr(servicer, method.name),
                request_deserializer=_deserializer(getattr(pb, method.input_type.name)),
                response_serializer=getattr(pb, method.output_type.name).SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)


def _service_name(servicer) -> str:
    """UserServicer -> UserService (each servicer class is named after its service)."""
    return type(servicer).__name__[:-len("Servicer")] + "Service"


__all__ = ["add_servicers"]
