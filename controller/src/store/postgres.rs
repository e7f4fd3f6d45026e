//! The shared store: PostgreSQL, for several controllers.
//!
//! The `postgres` client is synchronous (it runs its own small runtime), so
//! it never runs on the controller's async threads: a few worker threads
//! each own one connection and run the jobs sent to them. A caller blocks
//! for one round trip, as it would on the embedded SQLite file.
//!
//! Fencing: every write a driver makes runs in a transaction that first
//! takes `FOR SHARE` on the promotion's lease row *owned by this controller
//! and not expired* (database clock). Without it the write is refused with
//! [`LeaseLost`]; with it, a takeover (an `UPDATE` of that row) waits until
//! the write has committed, so no write of a former owner lands after the
//! new owner read the record.

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use amiprep_proto::v1::AgentInfo;
use anyhow::Context;
use postgres::{Client, NoTls, Transaction};
use prost::Message;
use tracing::warn;

use super::{
    Backend, Event, LeaseEvent, LeaseLost, PromotionRecord, PromotionSpec, RemoteSession, Resource,
    redact,
};
use crate::{
    registry::unix_ms,
    state::{PromotionState, ResourceKind},
};

/// Migrations in order; `schema_migrations` records the applied ones.
const MIGRATIONS: &[&str] = &[include_str!("../../migrations/postgres/0001_initial.sql")];

/// Connections (worker threads) per controller.
const WORKERS: usize = 4;

/// One `pg_advisory_lock` key for migrations, so controllers starting at
/// once apply them one at a time.
const MIGRATION_LOCK: i64 = 0x0061_6d69_7072_6570; // "amiprep"

type Job = Box<dyn FnOnce(&mut Client) + Send>;

pub struct Postgres {
    jobs: Mutex<mpsc::Sender<Job>>,
    owner: String,
    /// Set by [`Backend::release_all`]: a stopping controller takes no
    /// lease again, whatever a driver still running asks.
    closed: AtomicBool,
    /// Held (shared) across each lease acquisition, and exclusively by
    /// `release_all`, so no acquisition in flight lands after it.
    lease_gate: RwLock<()>,
}

impl Postgres {
    /// Connects, applies missing migrations (refusing a newer schema), and
    /// starts the workers.
    pub fn connect(url: &str, owner: &str) -> anyhow::Result<Postgres> {
        anyhow::ensure!(!owner.is_empty(), "store.controller_id must not be empty");
        let shown = redact(url);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        // Connect every worker before serving: a bad URL fails the start.
        let mut clients = Vec::with_capacity(WORKERS);
        for _ in 0..WORKERS {
            let url = url.to_owned();
            let c = thread::spawn(move || Client::connect(&url, NoTls))
                .join()
                .map_err(|_| anyhow::anyhow!("connecting to {shown}: the client panicked"))?
                .with_context(|| format!("connecting to {shown}"))?;
            clients.push(c);
        }
        for (n, mut client) in clients.into_iter().enumerate() {
            let rx = rx.clone();
            let url = url.to_owned();
            let shown = shown.clone();
            thread::Builder::new()
                .name(format!("amiprep-pg-{n}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(j) => j,
                            Err(_) => return, // the store was dropped
                        };
                        if client.is_closed() {
                            match Client::connect(&url, NoTls) {
                                Ok(c) => client = c,
                                Err(e) => warn!("reconnecting to {shown}: {e}"),
                            }
                        }
                        job(&mut client);
                    }
                })
                .context("starting a database worker")?;
        }
        let pg = Postgres {
            jobs: Mutex::new(tx),
            owner: owner.to_owned(),
            closed: AtomicBool::new(false),
            lease_gate: RwLock::new(()),
        };
        pg.run(migrate)
            .with_context(|| format!("migrating {shown}"))?;
        Ok(pg)
    }

    /// Runs `f` on a worker's connection and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| anyhow::anyhow!("the database workers have stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("a database worker stopped mid-query"))?
    }

    /// Runs `f` in a transaction fenced by this controller's lease on `id`.
    fn fenced<T: Send + 'static>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let id = id.to_owned();
        let owner = self.owner.clone();
        self.run(move |c| {
            let mut tx = c.transaction()?;
            let held = tx.query_opt(
                "SELECT 1 FROM leases WHERE promotion_id = $1 AND owner = $2 AND expires_at > now() FOR SHARE",
                &[&id, &owner],
            )?;
            if held.is_none() {
                return Err(LeaseLost(id).into());
            }
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }
}

fn now_ms() -> i64 {
    unix_ms(std::time::SystemTime::now()) as i64
}

fn migrate(c: &mut Client) -> anyhow::Result<()> {
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let result = (|| {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )?;
        let have: i32 = c
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )?
            .get(0);
        super::check_schema(have.into(), MIGRATIONS.len() as i64)?;
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
            let version = (n + 1) as i32;
            let mut tx = c.transaction()?;
            tx.batch_execute(sql)
                .with_context(|| format!("migration {version}"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )?;
            tx.commit()?;
        }
        anyhow::Ok(())
    })();
    let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    result
}

fn insert_event(
    tx: &mut Transaction<'_>,
    id: &str,
    at_ms: i64,
    state: &str,
    message: &str,
) -> Result<u64, postgres::Error> {
    tx.execute(
        "INSERT INTO events (promotion_id, at_ms, state, message) VALUES ($1, $2, $3, $4)",
        &[&id, &at_ms, &state, &message],
    )
}

const SELECT_RECORD: &str = "SELECT id, spec, region, state, failed_in, failure_reason, cancel_requested, report_json, report_sha256, manifest_path, created_ms, updated_ms, (SELECT message FROM events e WHERE e.promotion_id = p.id ORDER BY e.seq DESC LIMIT 1) FROM promotions p";

fn row_to_record(r: &postgres::Row) -> anyhow::Result<PromotionRecord> {
    let id: String = r.get(0);
    let spec: String = r.get(1);
    let state: String = r.get(3);
    let failed_in: Option<String> = r.get(4);
    Ok(PromotionRecord {
        spec: serde_json::from_str(&spec).with_context(|| format!("promotion {id}: spec"))?,
        region: r.get(2),
        state: PromotionState::parse(&state)
            .with_context(|| format!("promotion {id}: unknown state {state:?}"))?,
        failed_in: failed_in.as_deref().and_then(PromotionState::parse),
        failure_reason: r.get(5),
        cancel_requested: r.get(6),
        report_json: r.get(7),
        report_sha256: r.get(8),
        manifest_path: r.get(9),
        created_ms: r.get::<_, i64>(10) as u64,
        updated_ms: r.get::<_, i64>(11) as u64,
        resources: Vec::new(),
        last_message: r.get::<_, Option<String>>(12).unwrap_or_default(),
        id,
    })
}

/// Records of `rows` with their resources, read in one more query.
fn with_resources(
    c: &mut Client,
    rows: Vec<postgres::Row>,
) -> anyhow::Result<Vec<PromotionRecord>> {
    let mut recs = rows
        .iter()
        .map(row_to_record)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if recs.is_empty() {
        return Ok(recs);
    }
    let ids: Vec<&str> = recs.iter().map(|r| r.id.as_str()).collect();
    let res = c.query(
        "SELECT promotion_id, kind, region, id, deleted FROM resources WHERE promotion_id = ANY($1) ORDER BY ord",
        &[&ids],
    )?;
    let mut by_id: std::collections::HashMap<String, Vec<Resource>> = Default::default();
    for r in res {
        let kind: String = r.get(1);
        by_id.entry(r.get(0)).or_default().push(Resource {
            kind: ResourceKind::parse(&kind)
                .with_context(|| format!("unknown resource kind {kind:?}"))?,
            region: r.get(2),
            id: r.get(3),
            deleted: r.get(4),
        });
    }
    for rec in &mut recs {
        rec.resources = by_id.remove(&rec.id).unwrap_or_default();
    }
    Ok(recs)
}

impl Backend for Postgres {
    fn insert(&self, id: &str, spec: &PromotionSpec, region: &str) -> anyhow::Result<()> {
        let (id, spec_json, region, owner) = (
            id.to_owned(),
            serde_json::to_string(spec)?,
            region.to_owned(),
            self.owner.clone(),
        );
        let accepted = format!("promotion of {} accepted", spec.instance_id);
        // The lease is only as long as a first renewal needs; the driver
        // renews it at once.
        self.run(move |c| {
            let now = now_ms();
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO promotions (id, spec, region, state, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $5)",
                &[&id, &spec_json, &region, &PromotionState::Pending.as_str(), &now],
            )?;
            insert_event(&mut tx, &id, now, PromotionState::Pending.as_str(), &accepted)?;
            tx.execute(
                "INSERT INTO leases (promotion_id, owner, expires_at) VALUES ($1, $2, now() + interval '60 seconds')",
                &[&id, &owner],
            )?;
            tx.execute(
                "INSERT INTO lease_history (promotion_id, owner, what) VALUES ($1, $2, 'acquired')",
                &[&id, &owner],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn set_state(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()> {
        let (idc, message) = (id.to_owned(), message.to_owned());
        self.fenced(id, move |tx| {
            let now = now_ms();
            tx.execute(
                "UPDATE promotions SET state = $2, updated_ms = $3 WHERE id = $1",
                &[&idc, &state.as_str(), &now],
            )?;
            insert_event(tx, &idc, now, state.as_str(), &message)?;
            Ok(())
        })
    }

    fn fail(&self, id: &str, failed_in: PromotionState, reason: &str) -> anyhow::Result<()> {
        let (idc, reason) = (id.to_owned(), reason.to_owned());
        self.fenced(id, move |tx| {
            let now = now_ms();
            tx.execute(
                "UPDATE promotions SET state = $2, failed_in = COALESCE(failed_in, $3), failure_reason = COALESCE(failure_reason, $4), updated_ms = $5 WHERE id = $1",
                &[&idc, &PromotionState::CleaningUp.as_str(), &failed_in.as_str(), &reason, &now],
            )?;
            insert_event(
                tx,
                &idc,
                now,
                PromotionState::CleaningUp.as_str(),
                &format!("failed in {failed_in}: {reason}"),
            )?;
            Ok(())
        })
    }

    fn note(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()> {
        let (idc, message) = (id.to_owned(), message.to_owned());
        self.fenced(id, move |tx| {
            insert_event(tx, &idc, now_ms(), state.as_str(), &message)?;
            Ok(())
        })
    }

    fn request_cancel(&self, id: &str) -> anyhow::Result<bool> {
        let id = id.to_owned();
        self.run(move |c| {
            let n = c.execute(
                "UPDATE promotions SET cancel_requested = true, updated_ms = $2 WHERE id = $1",
                &[&id, &now_ms()],
            )?;
            Ok(n == 1)
        })
    }

    fn add_resource(
        &self,
        id: &str,
        kind: ResourceKind,
        region: &str,
        resource: &str,
    ) -> anyhow::Result<()> {
        let (idc, region, resource) = (id.to_owned(), region.to_owned(), resource.to_owned());
        self.fenced(id, move |tx| {
            tx.execute(
                "INSERT INTO resources (promotion_id, kind, region, id) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&idc, &kind.as_str(), &region, &resource],
            )?;
            Ok(())
        })
    }

    fn mark_deleted(
        &self,
        id: &str,
        kind: ResourceKind,
        region: &str,
        resource: &str,
    ) -> anyhow::Result<()> {
        let (idc, region, resource) = (id.to_owned(), region.to_owned(), resource.to_owned());
        self.fenced(id, move |tx| {
            tx.execute(
                "UPDATE resources SET deleted = true WHERE promotion_id = $1 AND kind = $2 AND region = $3 AND id = $4",
                &[&idc, &kind.as_str(), &region, &resource],
            )?;
            Ok(())
        })
    }

    fn set_report(&self, id: &str, json: &str, sha256: &str) -> anyhow::Result<()> {
        let (idc, json, sha) = (id.to_owned(), json.to_owned(), sha256.to_owned());
        self.fenced(id, move |tx| {
            tx.execute(
                "UPDATE promotions SET report_json = $2, report_sha256 = $3 WHERE id = $1",
                &[&idc, &json, &sha],
            )?;
            Ok(())
        })
    }

    fn set_manifest(&self, id: &str, path: &str) -> anyhow::Result<()> {
        let (idc, path) = (id.to_owned(), path.to_owned());
        self.fenced(id, move |tx| {
            tx.execute(
                "UPDATE promotions SET manifest_path = $2 WHERE id = $1",
                &[&idc, &path],
            )?;
            Ok(())
        })
    }

    fn get(&self, id: &str) -> anyhow::Result<Option<PromotionRecord>> {
        let id = id.to_owned();
        self.run(move |c| {
            let rows = c.query(&format!("{SELECT_RECORD} WHERE id = $1"), &[&id])?;
            Ok(with_resources(c, rows)?.pop())
        })
    }

    fn list(&self) -> anyhow::Result<Vec<PromotionRecord>> {
        self.run(|c| {
            let rows = c.query(&format!("{SELECT_RECORD} ORDER BY created_ms, id"), &[])?;
            with_resources(c, rows)
        })
    }

    fn unfinished(&self) -> anyhow::Result<Vec<PromotionRecord>> {
        let terminal: Vec<&'static str> = crate::state::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.as_str())
            .collect();
        self.run(move |c| {
            let rows = c.query(
                &format!("{SELECT_RECORD} WHERE NOT (state = ANY($1)) ORDER BY created_ms, id"),
                &[&terminal],
            )?;
            with_resources(c, rows)
        })
    }

    fn count_by_state(&self) -> anyhow::Result<Vec<(PromotionState, u64)>> {
        self.run(|c| {
            let rows = c.query("SELECT state, COUNT(*) FROM promotions GROUP BY state", &[])?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let s: String = r.get(0);
                    Some((PromotionState::parse(&s)?, r.get::<_, i64>(1) as u64))
                })
                .collect())
        })
    }

    fn events(&self, id: &str, after_seq: i64) -> anyhow::Result<Vec<Event>> {
        let id = id.to_owned();
        self.run(move |c| {
            let rows = c.query(
                "SELECT seq, at_ms, state, message FROM events WHERE promotion_id = $1 AND seq > $2 ORDER BY seq",
                &[&id, &after_seq],
            )?;
            Ok(rows
                .iter()
                .map(|r| Event {
                    seq: r.get(0),
                    at_ms: r.get::<_, i64>(1) as u64,
                    state: r.get(2),
                    message: r.get(3),
                })
                .collect())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn acquire_lease(&self, id: &str, secs: u64) -> anyhow::Result<bool> {
        let _gate = self.lease_gate.read().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let (id, owner) = (id.to_owned(), self.owner.clone());
        let secs = i64::try_from(secs).unwrap_or(i64::MAX / 2).max(1);
        self.run(move |c| {
            let mut tx = c.transaction()?;
            // Lock the row (if any) so the previous owner is read exactly.
            let prev = tx.query_opt(
                "SELECT owner, expires_at <= now() FROM leases WHERE promotion_id = $1 FOR UPDATE",
                &[&id],
            )?;
            let what = match &prev {
                Some(r) if r.get::<_, String>(0) == owner => None,
                Some(r) if r.get::<_, bool>(1) => Some("taken-over"),
                Some(_) => return Ok(false),
                None => Some("acquired"),
            };
            // Two controllers may both see no row: the insert decides.
            let n = tx.execute(
                "INSERT INTO leases (promotion_id, owner, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3::bigint)) \
                 ON CONFLICT (promotion_id) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at \
                 WHERE leases.owner = EXCLUDED.owner OR leases.expires_at <= now()",
                &[&id, &owner, &secs],
            )?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(what) = what {
                tx.execute(
                    "INSERT INTO lease_history (promotion_id, owner, what) VALUES ($1, $2, $3)",
                    &[&id, &owner, &what],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    fn release_lease(&self, id: &str) -> anyhow::Result<()> {
        let (id, owner) = (id.to_owned(), self.owner.clone());
        self.run(move |c| {
            let mut tx = c.transaction()?;
            let n = tx.execute(
                "DELETE FROM leases WHERE promotion_id = $1 AND owner = $2",
                &[&id, &owner],
            )?;
            if n > 0 {
                tx.execute(
                    "INSERT INTO lease_history (promotion_id, owner, what) VALUES ($1, $2, 'released')",
                    &[&id, &owner],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn release_all(&self) -> anyhow::Result<usize> {
        let _gate = self.lease_gate.write().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        let owner = self.owner.clone();
        self.run(move |c| {
            let mut tx = c.transaction()?;
            let released = tx.query(
                "DELETE FROM leases WHERE owner = $1 RETURNING promotion_id",
                &[&owner],
            )?;
            for r in &released {
                let id: String = r.get(0);
                tx.execute(
                    "INSERT INTO lease_history (promotion_id, owner, what) VALUES ($1, $2, 'released')",
                    &[&id, &owner],
                )?;
            }
            tx.execute("DELETE FROM agent_sessions WHERE controller = $1", &[&owner])?;
            tx.execute("DELETE FROM controllers WHERE id = $1", &[&owner])?;
            tx.commit()?;
            Ok(released.len())
        })
    }

    fn lease_history(&self, id: &str) -> anyhow::Result<Vec<LeaseEvent>> {
        let id = id.to_owned();
        self.run(move |c| {
            let rows = c.query(
                "SELECT promotion_id, owner, what FROM lease_history WHERE promotion_id = $1 ORDER BY seq",
                &[&id],
            )?;
            Ok(rows
                .iter()
                .map(|r| LeaseEvent {
                    promotion_id: r.get(0),
                    owner: r.get(1),
                    what: r.get(2),
                })
                .collect())
        })
    }

    fn publish_sessions(&self, sessions: &[AgentInfo]) -> anyhow::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let owner = self.owner.clone();
        let rows: Vec<(String, Vec<u8>)> = sessions
            .iter()
            .map(|s| (s.instance_id.clone(), s.encode_to_vec()))
            .collect();
        self.run(move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO controllers (id, seen_at) VALUES ($1, now()) ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                &[&owner],
            )?;
            tx.execute("DELETE FROM agent_sessions WHERE controller = $1", &[&owner])?;
            if !rows.is_empty() {
                let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
                let infos: Vec<&[u8]> = rows.iter().map(|r| r.1.as_slice()).collect();
                tx.execute(
                    "INSERT INTO agent_sessions (controller, instance_id, info) SELECT $1, * FROM unnest($2::text[], $3::bytea[]) ON CONFLICT DO NOTHING",
                    &[&owner, &ids, &infos],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn remote_sessions(&self, fresh_secs: u64) -> anyhow::Result<Vec<RemoteSession>> {
        let owner = self.owner.clone();
        let secs = i64::try_from(fresh_secs).unwrap_or(i64::MAX / 2);
        self.run(move |c| {
            let rows = c.query(
                "SELECT s.controller, s.info FROM agent_sessions s JOIN controllers k ON k.id = s.controller \
                 WHERE s.controller <> $1 AND k.seen_at > now() - make_interval(secs => $2::bigint) ORDER BY s.instance_id",
                &[&owner, &secs],
            )?;
            rows.iter()
                .map(|r| {
                    let info: Vec<u8> = r.get(1);
                    Ok(RemoteSession {
                        controller: r.get(0),
                        info: AgentInfo::decode(info.as_slice())
                            .context("decoding a published agent session")?,
                    })
                })
                .collect()
        })
    }
}
