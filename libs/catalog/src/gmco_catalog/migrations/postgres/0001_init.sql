-- The catalogue change log and the idempotency record of its writers.
-- IF NOT EXISTS: logs created before migrations were recorded take this migration as applied.
CREATE TABLE IF NOT EXISTS catalog_log (
    lsn BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot INTEGER NOT NULL,
    op SMALLINT NOT NULL,             -- 1 upsert, 2 delete
    media_id BIGINT NOT NULL,         -- the uint64 id as its two's-complement int64
    vector BYTEA,                     -- FP16 little-endian
    attributes BYTEA,                 -- gmco.common.v1.MediaAttributes
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS catalog_log_slot_lsn ON catalog_log (slot, lsn);
CREATE TABLE IF NOT EXISTS catalog_requests (
    request_id TEXT PRIMARY KEY,
    first_lsn BIGINT NOT NULL DEFAULT 0,
    last_lsn BIGINT NOT NULL DEFAULT 0
);
