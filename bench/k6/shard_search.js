// k6 load on one shard's Search directly (no router, no Envoy): the bare shard service's throughput, the
// reference the miss path is compared with in `make bench` (same data, same k').
//
//   .venv/bin/k6 run -e TARGET=127.0.0.1:7001 -e QUERIES=queries.json bench/k6/shard_search.js
//
// Environment: TARGET (host:port of a shard), QUERIES (a JSON list of base64 float32 query vectors and
// their dimension: {"dimension": 1024, "vectors": ["...", ...]}), K (50), VUS (8), DURATION (30s),
// REGION_MASK (a filter like the router's: region bit 1; 0 = none), PROTO_DIR (../../protos).
import grpc from 'k6/net/grpc';
import { check } from 'k6';

const env = (name, fallback) => (__ENV[name] === undefined || __ENV[name] === '' ? fallback : __ENV[name]);
const TARGET = env('TARGET', '127.0.0.1:7001');
const K = Number(env('K', '50'));
const REGION_MASK = Number(env('REGION_MASK', '1'));
const queries = JSON.parse(open(env('QUERIES', 'queries.json')));

const client = new grpc.Client();
client.load([env('PROTO_DIR', '../../protos')], 'gmco/shard/v1/shard_service.proto');

export const options = {
  scenarios: { load: { executor: 'constant-vus', vus: Number(env('VUS', '8')), duration: env('DURATION', '30s') } },
  thresholds: { checks: ['rate>0.99'] },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

let connected = false;

export default function () {
  if (!connected) {
    client.connect(TARGET, { plaintext: true, timeout: '5s' });
    connected = true;
  }
  const vector = queries.vectors[Math.floor(Math.random() * queries.vectors.length)];
  const request = {
    queries: { data: vector, dtype: 'D_TYPE_FLOAT32', dimension: queries.dimension, count: 1 },
    k: K, include_features: true, columnar: true,
  };
  if (REGION_MASK) request.filter = { region_mask: REGION_MASK };
  const res = client.invoke('gmco.shard.v1.ShardService/Search', request, { timeout: '2s' });
  check(res, { 'search OK': (r) => r && r.status === grpc.StatusOK });
}
