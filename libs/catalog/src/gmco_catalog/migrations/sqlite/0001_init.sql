-- The catalogue change log and the idempotency record of its writers (see ../postgres/0001_init.sql).
CREATE TABLE IF NOT EXISTS catalog_log (
    lsn INTEGER PRIMARY KEY AUTOINCREMENT,
    slot INTEGER NOT NULL,
    op INTEGER NOT NULL,
    media_id INTEGER NOT NULL,
    vector BLOB,
    attributes BLOB
);
CREATE TABLE IF NOT EXISTS catalog_requests (
    request_id TEXT PRIMARY KEY,
    first_lsn INTEGER NOT NULL,
    last_lsn INTEGER NOT NULL
);
