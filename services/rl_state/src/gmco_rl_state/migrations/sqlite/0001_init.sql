-- Per-user state, the feedback log (the idempotency record) and the model fingerprint.

CREATE TABLE user_state (
    user_id     TEXT PRIMARY KEY,
    version     INTEGER NOT NULL CHECK (version > 0),
    event_count INTEGER NOT NULL CHECK (event_count >= 0),
    pref        BLOB,              -- FP16 preference vector; NULL until the first positive reward
    bandit_a    BLOB NOT NULL,     -- float32 packed upper triangle of the bandit precision matrix
    bandit_b    BLOB NOT NULL,     -- float32 bandit response vector
    seen        BLOB NOT NULL,     -- uint64 ring of recently seen media ids, most recent first
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;

CREATE TABLE feedback_event (
    event_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    media_id    INTEGER NOT NULL,  -- the uint64 id as its two's-complement int64
    reward      REAL NOT NULL,
    event_ts_ms INTEGER NOT NULL,
    surface     INTEGER NOT NULL,
    region      TEXT NOT NULL,
    device      TEXT NOT NULL,
    propensity  REAL NOT NULL,
    has_vector  INTEGER NOT NULL,  -- 0: counted and marked seen, but the model did not learn from it
    applied_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;

CREATE TABLE model_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
