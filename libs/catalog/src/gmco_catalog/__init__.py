"""The durable catalogue log: the source of truth that every shard replica tails."""
