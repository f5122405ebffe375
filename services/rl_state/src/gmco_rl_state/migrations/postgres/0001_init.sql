-- Per-user state, the feedback log (the idempotency record) and the model fingerprint.

CREATE TABLE user_state (
    user_id     text PRIMARY KEY,
    version     bigint NOT NULL CHECK (version > 0),
    event_count bigint NOT NULL CHECK (event_count >= 0),
    pref        bytea,            -- FP16 preference vector; NULL until the first positive reward
    bandit_a    bytea NOT NULL,   -- float32 packed upper triangle of the bandit precision matrix
    bandit_b    bytea NOT NULL,   -- float32 bandit response vector
    seen        bytea NOT NULL,   -- uint64 ring of recently seen media ids, most recent first
    updated_at  timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);         -- every write updates the row: leave room for HOT updates

-- Random FP16/float32 bytes do not compress: do not spend CPU trying.
ALTER TABLE user_state ALTER COLUMN pref SET STORAGE EXTERNAL;
ALTER TABLE user_state ALTER COLUMN bandit_a SET STORAGE EXTERNAL;

CREATE TABLE feedback_event (
    event_id    text PRIMARY KEY,
    user_id     text NOT NULL,
    media_id    bigint NOT NULL,   -- the uint64 id as its two's-complement int64
    reward      real NOT NULL,
    event_ts_ms bigint NOT NULL,
    surface     smallint NOT NULL,
    region      text NOT NULL,
    device      text NOT NULL,
    propensity  real NOT NULL,
    has_vector  boolean NOT NULL,  -- false: counted and marked seen, but the model did not learn from it
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Raised by the feedback write when a concurrent writer got there first (the user's version moved, or
-- one of the events was inserted meanwhile): the statement, with its inserts, rolls back and the
-- service retries with fresh state.
CREATE FUNCTION rl_state_assert_applied(ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'user state changed concurrently' USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN true;
END
$$;
