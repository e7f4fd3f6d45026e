//! Persisted promotions, behind one trait with two back ends.
//!
//! Every transition and every resource id is committed here before the
//! cloud call that depends on it, so a controller killed at any point can
//! resume each unfinished promotion without duplicating or orphaning anything.
//!
//! - [`sqlite`]: embedded SQLite, the default; one controller per file.
//! - [`postgres`]: PostgreSQL (`[store] url = "postgres://…"`), shared by
//!   several controllers. A promotion is driven by one controller at a time
//!   under a *lease* (a row with owner and expiry, kept by the database's
//!   clock); every write a driver makes is fenced by that lease, so a
//!   controller that lost its lease (paused, partitioned) cannot overwrite
//!   the record of the controller that took over.
//!
//! Schemas are versioned migrations under `controller/migrations/`, applied
//! at start; a database whose schema is newer than this controller knows is
//! refused rather than written.

pub mod postgres;
pub mod sqlite;

use std::{ops::Deref, path::Path};

use amiprep_proto::v1::AgentInfo;
use serde::{Deserialize, Serialize};

use crate::state::{After, PromotionState, ResourceKind};

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

/// One change of a promotion's lease, for the record (`lease_history`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEvent {
    pub promotion_id: String,
    pub owner: String,
    /// `acquired`, `taken-over` (from an expired holder) or `released`.
    pub what: String,
}

/// An agent session held by another controller sharing the store.
#[derive(Debug, Clone)]
pub struct RemoteSession {
    pub controller: String,
    pub info: AgentInfo,
}

/// A write was refused because this controller no longer holds the
/// promotion's lease: another controller has (or may take) it over.
#[derive(Debug, thiserror::Error)]
#[error("the lease on promotion {0} is no longer held by this controller")]
pub struct LeaseLost(pub String);

/// True when `e` (or its cause) is a [`LeaseLost`].
pub fn is_lease_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<LeaseLost>().is_some())
}

/// What a store does. Calls are synchronous and short (one transaction on
/// loopback or an embedded file); callers treat errors as transient.
pub trait Backend: Send + Sync {
    /// Records a new promotion; on a shared store this controller holds its
    /// lease from the start.
    fn insert(&self, id: &str, spec: &PromotionSpec, region: &str) -> anyhow::Result<()>;
    /// Records a transition (and its event) atomically.
    fn set_state(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()>;
    /// Enters cleanup after a failure in `failed_in` (first failure wins).
    fn fail(&self, id: &str, failed_in: PromotionState, reason: &str) -> anyhow::Result<()>;
    /// Adds a message to the history without changing state.
    fn note(&self, id: &str, state: PromotionState, message: &str) -> anyhow::Result<()>;
    /// Any controller may ask; the driver acts on it.
    fn request_cancel(&self, id: &str) -> anyhow::Result<bool>;
    fn add_resource(
        &self,
        id: &str,
        kind: ResourceKind,
        region: &str,
        resource: &str,
    ) -> anyhow::Result<()>;
    fn mark_deleted(
        &self,
        id: &str,
        kind: ResourceKind,
        region: &str,
        resource: &str,
    ) -> anyhow::Result<()>;
    fn set_report(&self, id: &str, json: &str, sha256: &str) -> anyhow::Result<()>;
    fn set_manifest(&self, id: &str, path: &str) -> anyhow::Result<()>;
    fn get(&self, id: &str) -> anyhow::Result<Option<PromotionRecord>>;
    fn list(&self) -> anyhow::Result<Vec<PromotionRecord>>;
    /// Promotions not in a terminal state, with their resources.
    fn unfinished(&self) -> anyhow::Result<Vec<PromotionRecord>>;
    /// Number of promotions in each state (states with none left out).
    fn count_by_state(&self) -> anyhow::Result<Vec<(PromotionState, u64)>>;
    fn events(&self, id: &str, after_seq: i64) -> anyhow::Result<Vec<Event>>;

    /// True when several controllers may share this store (leases apply).
    fn shared(&self) -> bool;
    /// Takes or renews the lease on `id` for `secs` seconds: true when this
    /// controller holds it afterwards. A lease held by another controller
    /// is taken only once it has expired.
    fn acquire_lease(&self, id: &str, secs: u64) -> anyhow::Result<bool>;
    /// Gives the lease back (no-op when another controller holds it).
    fn release_lease(&self, id: &str) -> anyhow::Result<()>;
    /// Gives back every lease this controller holds and withdraws its
    /// sessions (orderly shutdown).
    fn release_all(&self) -> anyhow::Result<usize>;
    /// The lease changes of a promotion, oldest first.
    fn lease_history(&self, id: &str) -> anyhow::Result<Vec<LeaseEvent>>;
    /// Replaces this controller's published agent sessions with `sessions`
    /// and marks the controller alive.
    fn publish_sessions(&self, sessions: &[AgentInfo]) -> anyhow::Result<()>;
    /// Sessions published by the other live controllers (seen within
    /// `fresh_secs`).
    fn remote_sessions(&self, fresh_secs: u64) -> anyhow::Result<Vec<RemoteSession>>;
}

/// `[store]` in the controller configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `postgres://user:password@host:port/db`; unset: SQLite at
    /// `pipeline.state_db`.
    #[serde(default)]
    pub url: Option<String>,
    /// This controller's name in leases and sessions; default
    /// `HOSTNAME:AGENT_PORT`. Must differ between controllers sharing a
    /// database.
    #[serde(default)]
    pub controller_id: Option<String>,
    /// How long a lease lasts without renewal (seconds). A controller that
    /// dies loses its promotions after this long.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
}

fn default_lease_secs() -> u64 {
    15
}

/// The store a controller uses, with its owner name.
pub struct Store {
    backend: Box<dyn Backend>,
    owner: String,
}

impl Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl Store {
    /// SQLite at `path`, for the one controller on this machine.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        Ok(Store {
            backend: Box::new(sqlite::Sqlite::open(path)?),
            owner: "local".to_owned(),
        })
    }

    /// PostgreSQL at `url`, as controller `owner`.
    pub fn connect_postgres(url: &str, owner: &str) -> anyhow::Result<Store> {
        Ok(Store {
            backend: Box::new(postgres::Postgres::connect(url, owner)?),
            owner: owner.to_owned(),
        })
    }

    /// The store the configuration names.
    pub fn from_config(
        section: &StoreSection,
        state_db: &Path,
        owner: &str,
    ) -> anyhow::Result<Store> {
        match &section.url {
            Some(url) => Self::connect_postgres(url, owner),
            None => Self::open(state_db),
        }
    }

    /// This controller's name in leases and sessions.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

/// Refuses a database whose schema is newer than the migrations this
/// controller carries: writing it could corrupt what a newer version keeps.
pub(crate) fn check_schema(have: i64, known: i64) -> anyhow::Result<()> {
    anyhow::ensure!(
        have <= known,
        "the database schema is version {have}, newer than this controller knows ({known}): \
         upgrade amiprep before pointing it at this database"
    );
    Ok(())
}

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    if !url.contains("://") {
        // key=value form: hide the value of `password=`.
        return url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(x) => x,
        None => return url.to_owned(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact("postgres://amiprep:s3cret@db:5432/amiprep"),
            "postgres://amiprep:***@db:5432/amiprep"
        );
        assert_eq!(redact("postgres://db/amiprep"), "postgres://db/amiprep");
        assert_eq!(redact("postgres://u@db/amiprep"), "postgres://u@db/amiprep");
        assert_eq!(
            redact("host=db user=x password=y"),
            "host=db user=x password=***"
        );
    }

    #[test]
    fn lease_lost_is_found_through_context() {
        let e = anyhow::Error::new(LeaseLost("p".into())).context("recording state");
        assert!(is_lease_lost(&e));
        assert!(!is_lease_lost(&anyhow::anyhow!("busy")));
    }
}
