//! Persisted promotions (embedded SQLite).
//!
//! Every transition and every resource id is committed here before the
//! cloud call that depends on it, so a controller killed at any point can
//! resume each unfinished promotion without duplicating or orphaning anything.

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::{
    registry::unix_ms,
    state::{After, PromotionState, ResourceKind},
};

/// What the operator asked for (`amiprep promote ...`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromotionSpec {
    pub instance_id: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<(String, String)>,
    pub policy_toml: String,
    pub copy_to: Vec<(String, String)>,
    pub share_with: Vec<String>,
    pub deprecate_after_days: u32,
    pub after: After,
    pub canary: bool,
    pub keep_on_failure: bool,
}

/// A cloud resource a promotion created.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resource {
    pub kind: ResourceKind,
    pub region: String,
    pub id: String,
    /// Set once the resource has been removed by cleanup.
    pub deleted: bool,
}

#[derive(Debug, Clone)]
pub struct PromotionRecord {
    pub id: String,
    pub spec: PromotionSpec,
    pub region: String,
    pub state: PromotionState,
    /// The state a failure or cancel interrupted, for the record.
    pub failed_in: Option<PromotionState>,
    pub failure_reason: Option<String>,
    pub cancel_requested: bool,
    pub report_json: Option<String>,
    pub report_sha256: Option<String>,
    pub manifest_path: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub resources: Vec<Resource>,
    /// The latest history line: progress while running; at the end, what
    /// cleanup removed or kept and what became of the source.
    pub last_message: String,
}

impl PromotionRecord {
    pub fn image(&self) -> Option<&Resource> {
        self.resources
            .iter()
            .find(|r| r.kind == ResourceKind::Image)
    }

    pub fn resources_of(&self, kind: ResourceKind) -> impl Iterator<Item = &Resource> {
        self.resources.iter().filter(move |r| r.kind == kind)
    }
}

/// One line of a promotion's history.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub seq: i64,
    pub at_ms: u64,
    pub state: String,
    pub message: String,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
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
";

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // WAL + FULL: a committed transition survives a crash or power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the schema in {}", path.display()))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, id: &str, spec: &PromotionSpec, region: &str) -> anyhow::Result<()> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO promotions (id, spec, region, state, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![id, serde_json::to_string(spec)?, region, PromotionState::Pending.as_str(), now as i64],
        )?;
        insert_event(
            &tx,
            id,
            now as i64,
            PromotionState::Pending.as_str(),
            &format!("promotion of {} accepted", spec.instance_id),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records a transition (and its event) atomically.
    pub fn set_state(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()> {
        let now = now_ms() as i64;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE promotions SET state = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, state.as_str(), now],
        )?;
        insert_event(&tx, id, now, state.as_str(), message)?;
        tx.commit()?;
        Ok(())
    }

    /// Enters cleanup after a failure in `failed_in` (first failure wins).
    pub fn fail(&self, id: &str, failed_in: PromotionState, reason: &str) -> anyhow::Result<()> {
        let now = now_ms() as i64;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE promotions SET state = ?2, failed_in = COALESCE(failed_in, ?3), failure_reason = COALESCE(failure_reason, ?4), updated_ms = ?5 WHERE id = ?1",
            params![id, PromotionState::CleaningUp.as_str(), failed_in.as_str(), reason, now],
        )?;
        insert_event(
            &tx,
            id,
            now,
            PromotionState::CleaningUp.as_str(),
            &format!("failed in {failed_in}: {reason}"),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Adds a message to the history without changing state.
    pub fn note(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()> {
        insert_event(&self.conn(), id, now_ms() as i64, state.as_str(), message)?;
        Ok(())
    }

    pub fn request_cancel(&self, id: &str) -> anyhow::Result<bool> {
        let n = self.conn().execute(
            "UPDATE promotions SET cancel_requested = 1, updated_ms = ?2 WHERE id = ?1",
            params![id, now_ms() as i64],
        )?;
        Ok(n == 1)
    }

    pub fn add_resource(
        &self,
        id: &str,
        kind: ResourceKind,
        region: &str,
        resource: &str,
    ) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO resources (promotion_id, kind, region, id) VALUES (?1, ?2, ?3, ?4)",
            params![id, kind.as_str(), region, resource],
        )?;
        Ok(())
    }

    pub fn mark_deleted(
        &self,
        id: &str,
        kind: ResourceKind,
        region: &str,
        resource: &str,
    ) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE resources SET deleted = 1 WHERE promotion_id = ?1 AND kind = ?2 AND region = ?3 AND id = ?4",
            params![id, kind.as_str(), region, resource],
        )?;
        Ok(())
    }

    pub fn set_report(&self, id: &str, json: &str, sha256: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE promotions SET report_json = ?2, report_sha256 = ?3 WHERE id = ?1",
            params![id, json, sha256],
        )?;
        Ok(())
    }

    pub fn set_manifest(&self, id: &str, path: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE promotions SET manifest_path = ?2 WHERE id = ?1",
            params![id, path],
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Option<PromotionRecord>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT id, spec, region, state, failed_in, failure_reason, cancel_requested, report_json, report_sha256, manifest_path, created_ms, updated_ms, (SELECT message FROM events e WHERE e.promotion_id = promotions.id ORDER BY e.seq DESC LIMIT 1) FROM promotions WHERE id = ?1",
                params![id],
                row_to_record,
            )
            .optional()?;
        let Some(mut rec) = row.transpose()? else {
            return Ok(None);
        };
        rec.resources = resources(&conn, id)?;
        Ok(Some(rec))
    }

    pub fn list(&self) -> anyhow::Result<Vec<PromotionRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, spec, region, state, failed_in, failure_reason, cancel_requested, report_json, report_sha256, manifest_path, created_ms, updated_ms, (SELECT message FROM events e WHERE e.promotion_id = promotions.id ORDER BY e.seq DESC LIMIT 1) FROM promotions ORDER BY created_ms, id",
        )?;
        let rows: Vec<anyhow::Result<PromotionRecord>> = stmt
            .query_map([], row_to_record)?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut rec = r?;
            rec.resources = resources(&conn, &rec.id)?;
            out.push(rec);
        }
        Ok(out)
    }

    pub fn events(&self, id: &str, after_seq: i64) -> anyhow::Result<Vec<Event>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, state, message FROM events WHERE promotion_id = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        let events = stmt
            .query_map(params![id, after_seq], |r| {
                Ok(Event {
                    seq: r.get(0)?,
                    at_ms: r.get::<_, i64>(1)? as u64,
                    state: r.get(2)?,
                    message: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(events)
    }
}

/// One line of a promotion's history; part of the caller's transaction.
fn insert_event(
    conn: &Connection,
    id: &str,
    at_ms: i64,
    state: &str,
    message: &str,
) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT INTO events (promotion_id, at_ms, state, message) VALUES (?1, ?2, ?3, ?4)",
        params![id, at_ms, state, message],
    )
}

fn resources(conn: &Connection, id: &str) -> anyhow::Result<Vec<Resource>> {
    let mut stmt = conn.prepare(
        "SELECT kind, region, id, deleted FROM resources WHERE promotion_id = ?1 ORDER BY rowid",
    )?;
    let v = stmt
        .query_map(params![id], |r| {
            let kind: String = r.get(0)?;
            Ok(Resource {
                kind: ResourceKind::parse(&kind).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        format!("unknown resource kind {kind:?}").into(),
                    )
                })?,
                region: r.get(1)?,
                id: r.get(2)?,
                deleted: r.get::<_, i64>(3)? != 0,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(v)
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<anyhow::Result<PromotionRecord>> {
    let spec: String = r.get(1)?;
    let state: String = r.get(3)?;
    let failed_in: Option<String> = r.get(4)?;
    let id: String = r.get(0)?;
    Ok((|| {
        Ok(PromotionRecord {
            spec: serde_json::from_str(&spec).with_context(|| format!("promotion {id}: spec"))?,
            region: r.get(2)?,
            state: PromotionState::parse(&state)
                .with_context(|| format!("promotion {id}: unknown state {state:?}"))?,
            failed_in: failed_in.as_deref().and_then(PromotionState::parse),
            failure_reason: r.get(5)?,
            cancel_requested: r.get::<_, i64>(6)? != 0,
            report_json: r.get(7)?,
            report_sha256: r.get(8)?,
            manifest_path: r.get(9)?,
            created_ms: r.get::<_, i64>(10)? as u64,
            updated_ms: r.get::<_, i64>(11)? as u64,
            resources: Vec::new(),
            last_message: r.get::<_, Option<String>>(12)?.unwrap_or_default(),
            id: id.clone(),
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_resources_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let spec = PromotionSpec {
            instance_id: "i-0123456789abcdef0".into(),
            name: "web".into(),
            canary: true,
            ..Default::default()
        };
        {
            let s = Store::open(&path).unwrap();
            s.insert("p1", &spec, "us-east-1").unwrap();
            s.set_state("p1", PromotionState::CreatingImage, "creating")
                .unwrap();
            s.add_resource("p1", ResourceKind::Image, "us-east-1", "ami-1")
                .unwrap();
            s.add_resource("p1", ResourceKind::Image, "us-east-1", "ami-1")
                .unwrap();
            s.add_resource("p1", ResourceKind::Snapshot, "us-east-1", "snap-1")
                .unwrap();
            s.mark_deleted("p1", ResourceKind::Snapshot, "us-east-1", "snap-1")
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rec = s.get("p1").unwrap().unwrap();
        assert_eq!(rec.state, PromotionState::CreatingImage);
        assert_eq!(rec.spec, spec);
        assert_eq!(rec.resources.len(), 2, "duplicates are ignored");
        assert_eq!(rec.image().unwrap().id, "ami-1");
        assert!(rec.resources_of(ResourceKind::Snapshot).all(|r| r.deleted));
        let events = s.events("p1", 0).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].state, "creating-image");
        assert!(s.get("nope").unwrap().is_none());
    }

    #[test]
    fn first_failure_reason_wins() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db")).unwrap();
        s.insert("p", &PromotionSpec::default(), "r").unwrap();
        s.fail("p", PromotionState::AwaitingImage, "image failed")
            .unwrap();
        s.fail("p", PromotionState::CleaningUp, "later").unwrap();
        let rec = s.get("p").unwrap().unwrap();
        assert_eq!(rec.state, PromotionState::CleaningUp);
        assert_eq!(rec.failed_in, Some(PromotionState::AwaitingImage));
        assert_eq!(rec.failure_reason.as_deref(), Some("image failed"));
    }
}
