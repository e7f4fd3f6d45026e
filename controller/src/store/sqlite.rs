//! The embedded store: one SQLite file, one controller. Leases do not apply
//! (nothing else writes the file), so every lease call succeeds.

use std::{
    path::Path,
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use amiprep_proto::v1::AgentInfo;
use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Backend, Event, LeaseEvent, PromotionRecord, PromotionSpec, RemoteSession, Resource};
use crate::{
    registry::unix_ms,
    state::{PromotionState, ResourceKind},
};

pub struct Sqlite {
    conn: Mutex<Connection>,
}

/// Migrations in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/sqlite/0001_initial.sql")];

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl Sqlite {
    pub fn open(path: &Path) -> anyhow::Result<Sqlite> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // WAL + FULL: a committed transition survives a crash or power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn).with_context(|| format!("migrating {}", path.display()))?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for Sqlite {
    fn insert(&self, id: &str, spec: &PromotionSpec, region: &str) -> anyhow::Result<()> {
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

    fn set_state(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()> {
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

    fn fail(&self, id: &str, failed_in: PromotionState, reason: &str) -> anyhow::Result<()> {
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

    fn note(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()> {
        insert_event(&self.conn(), id, now_ms() as i64, state.as_str(), message)?;
        Ok(())
    }

    fn request_cancel(&self, id: &str) -> anyhow::Result<bool> {
        let n = self.conn().execute(
            "UPDATE promotions SET cancel_requested = 1, updated_ms = ?2 WHERE id = ?1",
            params![id, now_ms() as i64],
        )?;
        Ok(n == 1)
    }

    fn add_resource(
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

    fn mark_deleted(
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

    fn set_report(&self, id: &str, json: &str, sha256: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE promotions SET report_json = ?2, report_sha256 = ?3 WHERE id = ?1",
            params![id, json, sha256],
        )?;
        Ok(())
    }

    fn set_manifest(&self, id: &str, path: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE promotions SET manifest_path = ?2 WHERE id = ?1",
            params![id, path],
        )?;
        Ok(())
    }

    fn get(&self, id: &str) -> anyhow::Result<Option<PromotionRecord>> {
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

    fn list(&self) -> anyhow::Result<Vec<PromotionRecord>> {
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

    fn events(&self, id: &str, after_seq: i64) -> anyhow::Result<Vec<Event>> {
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

    fn unfinished(&self) -> anyhow::Result<Vec<PromotionRecord>> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .collect())
    }

    fn count_by_state(&self) -> anyhow::Result<Vec<(PromotionState, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM promotions GROUP BY state")?;
        let rows: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(s, n)| Some((PromotionState::parse(&s)?, n as u64)))
            .collect())
    }

    fn shared(&self) -> bool {
        false
    }

    fn acquire_lease(&self, _id: &str, _secs: u64) -> anyhow::Result<bool> {
        Ok(true)
    }

    fn release_lease(&self, _id: &str) -> anyhow::Result<()> {
        Ok(())
    }

    fn release_all(&self) -> anyhow::Result<usize> {
        Ok(0)
    }

    fn lease_history(&self, _id: &str) -> anyhow::Result<Vec<LeaseEvent>> {
        Ok(Vec::new())
    }

    fn publish_sessions(&self, _sessions: &[AgentInfo]) -> anyhow::Result<()> {
        Ok(())
    }

    fn remote_sessions(&self, _fresh_secs: u64) -> anyhow::Result<Vec<RemoteSession>> {
        Ok(Vec::new())
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

/// Applies the migrations this file lacks; refuses a newer schema.
fn migrate(conn: &Connection) -> anyhow::Result<()> {
    let have: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    super::check_schema(have, known)?;
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("migration {}", n + 1))?;
        tx.pragma_update(None, "user_version", (n + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
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
    use crate::store::Store;

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

    #[test]
    fn a_newer_schema_is_refused_and_an_old_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            // A file from before versioned migrations: tables, user_version 0.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.execute(
                "INSERT INTO promotions (id, spec, region, state, created_ms, updated_ms) VALUES ('old', ?1, 'r', 'pending', 1, 1)",
                [serde_json::to_string(&PromotionSpec::default()).unwrap()],
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.list().unwrap().len(), 1, "rows kept across the migration");
        drop(s);
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path)
            .err()
            .expect("a newer schema must be refused");
        assert!(format!("{err:#}").contains("newer"), "{err:#}");
    }

    #[test]
    fn counts_by_state_and_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db")).unwrap();
        for id in ["a", "b", "c"] {
            s.insert(id, &PromotionSpec::default(), "r").unwrap();
        }
        s.set_state("c", PromotionState::Promoted, "done").unwrap();
        let mut counts = s.count_by_state().unwrap();
        counts.sort_by_key(|(st, _)| st.as_str());
        assert_eq!(
            counts,
            vec![(PromotionState::Pending, 2), (PromotionState::Promoted, 1)]
        );
        let mut ids: Vec<_> = s.unfinished().unwrap().into_iter().map(|r| r.id).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
    }
}
