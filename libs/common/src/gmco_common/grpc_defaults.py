"""gRPC core settings every GMC-O service process starts with; import this before anything imports grpc.

gRPC reads ``GRPC_EXPERIMENTS`` once, when the library loads, so a service's ``__main__`` imports this
module first. The default turns off two of gRPC's EventEngine experiments, ``event_engine_listener``
(accepted connections) and ``event_engine_client`` (outgoing channels): with them on, each call hops
between EventEngine threads, the asyncio poller thread and the event loop. ``make bench-grpc-floor``
(docs/benchmarks.md, "gRPC core settings"; one call at a time, server and client each its own process):
11.8 thread switches per call on the server and 6.2 on the client with gRPC's defaults, 6.4 and 2.2
without the two experiments, and about 10 % less CPU per call on each side. An operator's own
``GRPC_EXPERIMENTS`` (even an empty one, which keeps gRPC's defaults) is left as it is.
"""

from __future__ import annotations

import os
import sys

EXPERIMENTS = "-event_engine_listener,-event_engine_client"

#: Whether the default could still take effect: gRPC was not loaded yet when this module ran.
APPLIED_BEFORE_GRPC = "grpc._cython.cygrpc" not in sys.modules
os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
