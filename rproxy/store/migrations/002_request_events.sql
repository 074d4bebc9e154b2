-- rproxy schema, version 2: per-request records (the seed's request-message
-- topic), kept for the heartbeat retention time; each record counts once in
-- stats, however often the event stream delivers it.
CREATE TABLE request_events (
    event_id    text PRIMARY KEY,
    at          timestamptz NOT NULL,
    tunnel      text NOT NULL,
    key_name    text NOT NULL,
    agent_id    text NOT NULL,
    model       text,
    method      text NOT NULL DEFAULT '',
    target      text NOT NULL DEFAULT '',
    bytes_in    bigint NOT NULL DEFAULT 0,
    bytes_out   bigint NOT NULL DEFAULT 0,
    duration    real NOT NULL DEFAULT 0
);
CREATE INDEX request_events_at ON request_events (at);
CREATE INDEX stats_key_agent ON stats (key_name, agent_id, period_start);
