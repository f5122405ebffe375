"""How the router starts: settings -> shard pool, channels to cache / ontology / rl_state, catalogue log
-> recommender and servicer -> server."""

from __future__ import annotations

import contextlib

from gmco.cache.v1 import cache_service_pb2_grpc
from gmco.ontology.v1 import ontology_service_pb2_grpc
from gmco.rl_state.v1 import rl_state_service_pb2_grpc
from gmco.router.v1 import router_service_pb2_grpc
from gmco_catalog import open_log
from gmco_common.channels import ChannelOptions, make_channel
from gmco_common.server import Registration, RunningServer, start_server
from gmco_common.slots import SlotMap

from gmco_router.catalogue import Catalogue
from gmco_router.config import PREFIX, Settings
from gmco_router.recommend import Recommender
from gmco_router.replicas import ReplicaPolicy, ShardPool, parse_shard_spec
from gmco_router.servicer import RecommendationServicer

SERVICE = "gmco.router.v1.RecommendationService"


def build_pool(s: Settings) -> ShardPool:
    policy = ReplicaPolicy(s.breaker_failures, s.breaker_cooldown_seconds, s.hedge, s.hedge_min_delay_ms / 1000,
                           s.hedge_min_samples, s.health_interval_seconds)
    options = ChannelOptions(s.max_message_bytes, s.call_timeout_seconds, max_attempts=2, auth_token=s.auth_token,
                             tls_ca_file=s.shard_tls_ca_file, tls_cert_file=s.shard_tls_cert_file,
                             tls_key_file=s.shard_tls_key_file)
    if s.shard_dns:
        return ShardPool.from_dns(s.shard_dns, s.shard_count, policy, options, s.dns_refresh_seconds)
    return ShardPool(parse_shard_spec(s.shards, PREFIX + "SHARDS"), policy, options)


async def start(s: Settings, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Open the clients on ``stack`` and start the server (used by ``serve`` and by the tests)."""
    options = ChannelOptions(s.max_message_bytes, s.call_timeout_seconds, auth_token=s.auth_token)
    pool = await stack.enter_async_context(build_pool(s))
    cache = await stack.enter_async_context(make_channel(s.cache_target, options))
    ontology = await stack.enter_async_context(make_channel(s.ontology_target, options))
    rl_state = await stack.enter_async_context(make_channel(s.rl_state_target, options))
    slot_map = SlotMap.from_json(s.slot_map_file.read_text()) if s.slot_map_file else SlotMap.even(pool.shard_count)
    log = await stack.enter_async_context(open_log(s.catalog_dsn)) if s.catalog_dsn else None
    catalogue = Catalogue(pool, slot_map, log, s.media_dim, s.catalog_timeout_seconds)
    rl_stub = rl_state_service_pb2_grpc.RLStateServiceStub(rl_state)
    recommender = Recommender(s, pool, catalogue, cache_service_pb2_grpc.CacheServiceStub(cache),
                              ontology_service_pb2_grpc.OntologyServiceStub(ontology), rl_stub)
    stack.push_async_callback(recommender.close)  # after the server stopped: the last cache writes finish
    servicer = RecommendationServicer(recommender, catalogue, rl_stub, s)
    running = await start_server(s, [Registration(
        router_service_pb2_grpc.add_RecommendationServiceServicer_to_server, servicer, SERVICE)], stack=stack)
    running.parts.update(pool=pool, recommender=recommender, catalogue=catalogue)
    return running
