-- amiprep controller state, SQLite, version 1. IF NOT EXISTS: files made
-- before versioned migrations already have these tables.
CREATE TABLE IF NOT EXISTS promotions (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    region TEXT NOT NULL,
    state TEXT NOT NULL,
    failed_in TEXT,
    failure_reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    report_json TEXT,
    report_sha256 TEXT,
    manifest_path TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS resources (
    promotion_id TEXT NOT NULL REFERENCES promotions(id),
    kind TEXT NOT NULL,
    region TEXT NOT NULL,
    id TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (promotion_id, kind, region, id)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    promotion_id TEXT NOT NULL REFERENCES promotions(id),
    at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_promotion ON events(promotion_id, seq);
