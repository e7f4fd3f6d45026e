-- amiprep controller state, PostgreSQL, version 1: promotions as in SQLite,
-- plus leases (one driver per promotion) and the agent sessions each
-- controller holds.
CREATE TABLE promotions (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    region TEXT NOT NULL,
    state TEXT NOT NULL,
    failed_in TEXT,
    failure_reason TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    report_json TEXT,
    report_sha256 TEXT,
    manifest_path TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX promotions_by_state ON promotions(state);
CREATE TABLE resources (
    promotion_id TEXT NOT NULL REFERENCES promotions(id),
    kind TEXT NOT NULL,
    region TEXT NOT NULL,
    id TEXT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false,
    ord BIGSERIAL,
    PRIMARY KEY (promotion_id, kind, region, id)
);
CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    promotion_id TEXT NOT NULL REFERENCES promotions(id),
    at_ms BIGINT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX events_by_promotion ON events(promotion_id, seq);
-- The one controller driving a promotion, until expires_at (database clock).
CREATE TABLE leases (
    promotion_id TEXT PRIMARY KEY REFERENCES promotions(id),
    owner TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE lease_history (
    seq BIGSERIAL PRIMARY KEY,
    promotion_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    what TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX lease_history_by_promotion ON lease_history(promotion_id, seq);
CREATE TABLE controllers (
    id TEXT PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL
);
-- AgentInfo (protobuf) of each session a controller holds.
CREATE TABLE agent_sessions (
    controller TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    info BYTEA NOT NULL,
    PRIMARY KEY (controller, instance_id)
);
CREATE INDEX agent_sessions_by_instance ON agent_sessions(instance_id);
