-- rproxy schema, version 1.
-- API keys are stored as SHA-256 digests, never in plain text.
CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    digest      bytea NOT NULL UNIQUE,
    name        text NOT NULL,
    level       integer NOT NULL DEFAULT -1 CHECK (level >= -1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE agents (
    id           text PRIMARY KEY,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    system_info  jsonb NOT NULL DEFAULT '{}',
    models       jsonb NOT NULL DEFAULT '[]'
);

-- heartbeat time series; a retention job deletes old rows
CREATE TABLE heartbeats (
    agent_id        text NOT NULL,
    at              timestamptz NOT NULL,
    cpu             real NOT NULL,
    memory          real NOT NULL,
    disk            real NOT NULL,
    load            real NOT NULL,
    active_streams  integer NOT NULL,
    event_id        text UNIQUE            -- idempotent inserts from the event stream
);
CREATE INDEX heartbeats_agent_at ON heartbeats (agent_id, at);
CREATE INDEX heartbeats_at ON heartbeats (at);

-- requests and bytes per key, agent and period
CREATE TABLE stats (
    period_start  timestamptz NOT NULL,
    key_name      text NOT NULL,
    agent_id      text NOT NULL,
    requests      bigint NOT NULL DEFAULT 0,
    bytes_in      bigint NOT NULL DEFAULT 0,
    bytes_out     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (period_start, key_name, agent_id)
);

-- the VK gateway's config.local: backend servers, live
CREATE TABLE backends (
    server_id   text PRIMARY KEY,
    pool        text NOT NULL,
    provider    text NOT NULL DEFAULT '',
    name        text NOT NULL,
    address     text NOT NULL,
    weight      integer NOT NULL DEFAULT 1 CHECK (weight >= 0 AND weight <= 1000),
    enabled     boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION rproxy_backends_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('rproxy_backends', COALESCE(NEW.pool, OLD.pool));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER backends_notify AFTER INSERT OR UPDATE OR DELETE ON backends
    FOR EACH ROW EXECUTE FUNCTION rproxy_backends_notify();
