//! The registry of connected agents, keyed by verified instance id, and of
//! who may speak for which promotion.
//!
//! When the pipeline sends a request down an instance's session it becomes
//! that promotion's *waiter*, bound to the session it sent on and to the
//! role the request gives that instance: a `Prepare` makes it the source
//! (its `Progress` and `Report` count), a `Verify` makes it the canary (its
//! `VerifyResult` counts). An event is handed over only when it comes from
//! that very session and fits that role; everything else is refused, so an
//! agent cannot give a verdict for a promotion by writing its id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use amiprep_proto::v1::{
    AgentInfo, ControllerMessage, Progress, Report, VerifyResult, controller_message,
};
use tokio::sync::{Notify, mpsc};
use tonic::Status;

/// The sending half of a session's response stream.
pub type SessionSender = mpsc::Sender<Result<ControllerMessage, Status>>;

/// What an agent sends back about a promotion.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    Progress(Progress),
    Report(Report),
    Verify(VerifyResult),
}

impl AgentEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            AgentEvent::Progress(_) => "progress",
            AgentEvent::Report(_) => "report",
            AgentEvent::Verify(_) => "verify-result",
        }
    }
}

/// What a request makes the instance it was sent to, for that promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sent `Prepare`: may send `Progress` and `Report`.
    Source,
    /// Sent `Verify`: may send `VerifyResult`.
    Canary,
}

impl Role {
    /// The role a request gives its recipient; `None` for messages that
    /// expect no answer.
    pub fn of_request(msg: &controller_message::Msg) -> Option<Role> {
        match msg {
            controller_message::Msg::Prepare(_) => Some(Role::Source),
            controller_message::Msg::Verify(_) => Some(Role::Canary),
            _ => None,
        }
    }

    fn admits(self, event: &AgentEvent) -> bool {
        match self {
            Role::Source => matches!(event, AgentEvent::Progress(_) | AgentEvent::Report(_)),
            Role::Canary => matches!(event, AgentEvent::Verify(_)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Canary => "canary",
        }
    }
}

/// Why an agent's event was not handed to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("nothing waits for promotion {0:?}")]
    NobodyWaiting(String),
    #[error("promotion {promotion:?} waits for instance {expected}, not this one")]
    WrongInstance { promotion: String, expected: String },
    #[error("promotion {promotion:?} waits for an earlier session of this instance")]
    OtherSession { promotion: String },
    #[error("promotion {promotion:?} waits for its {role}, which does not send a {kind}")]
    WrongRole {
        promotion: String,
        role: &'static str,
        kind: &'static str,
    },
}

impl Refused {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::NobodyWaiting(_) => "nobody-waiting",
            Refused::WrongInstance { .. } => "wrong-instance",
            Refused::OtherSession { .. } => "other-session",
            Refused::WrongRole { .. } => "wrong-role",
        }
    }
}

/// Whoever waits for a promotion's events, and whose events those may be.
#[derive(Debug)]
struct Waiter {
    instance_id: String,
    session_id: String,
    role: Role,
    tx: mpsc::UnboundedSender<AgentEvent>,
}

/// One live session.
#[derive(Debug)]
struct Entry {
    info: AgentInfo,
    last_heartbeat: Instant,
    /// Wakes the session task so it ends the stream.
    drop_signal: Arc<Notify>,
    tx: Option<SessionSender>,
}

#[derive(Debug, Default)]
pub struct Registry {
    agents: Mutex<HashMap<String, Entry>>,
    /// Promotion id -> whoever waits for that promotion's agent events.
    listeners: Mutex<HashMap<String, Waiter>>,
}

/// Handle a session task keeps; removing the session from the registry
/// happens through it so a replaced session cannot remove its successor.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub instance_id: String,
    pub session_id: String,
    pub drop_signal: Arc<Notify>,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a session; an older session of the same instance is told to end.
    pub fn register(&self, info: AgentInfo) -> SessionHandle {
        self.register_with(info, None)
    }

    /// Adds a session whose stream can carry requests to the agent.
    pub fn register_with(&self, info: AgentInfo, tx: Option<SessionSender>) -> SessionHandle {
        let handle = SessionHandle {
            instance_id: info.instance_id.clone(),
            session_id: info.session_id.clone(),
            drop_signal: Arc::new(Notify::new()),
        };
        let entry = Entry {
            info,
            last_heartbeat: Instant::now(),
            drop_signal: handle.drop_signal.clone(),
            tx,
        };
        if let Some(old) = self.lock().insert(handle.instance_id.clone(), entry) {
            old.drop_signal.notify_one();
        }
        handle
    }

    pub fn heartbeat(&self, handle: &SessionHandle) {
        if let Some(e) = self.lock().get_mut(&handle.instance_id)
            && e.info.session_id == handle.session_id
        {
            e.last_heartbeat = Instant::now();
            e.info.last_heartbeat_unix_ms = unix_ms(SystemTime::now());
        }
    }

    pub fn remove(&self, handle: &SessionHandle) {
        let mut agents = self.lock();
        if agents
            .get(&handle.instance_id)
            .is_some_and(|e| e.info.session_id == handle.session_id)
        {
            agents.remove(&handle.instance_id);
        }
    }

    /// Drops sessions silent for longer than `timeout`; returns their instance ids.
    pub fn reap(&self, timeout: Duration) -> Vec<String> {
        let mut agents = self.lock();
        let stale: Vec<String> = agents
            .iter()
            .filter(|(_, e)| e.last_heartbeat.elapsed() > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for id in &stale {
            if let Some(e) = agents.remove(id) {
                e.drop_signal.notify_one();
            }
        }
        stale
    }

    /// Session id of the instance's current session.
    pub fn session_of(&self, instance_id: &str) -> Option<String> {
        self.lock()
            .get(instance_id)
            .map(|e| e.info.session_id.clone())
    }

    /// Sends `msg` to the instance's agent and subscribes to the events of
    /// `promotion_id` that this session sends in the role `msg` gives it
    /// (see [`Role::of_request`]). Returns the session id used, or `None`
    /// when the instance has no session.
    pub async fn request(
        &self,
        instance_id: &str,
        promotion_id: &str,
        msg: controller_message::Msg,
    ) -> Option<(String, mpsc::UnboundedReceiver<AgentEvent>)> {
        let (session, tx) = {
            let agents = self.lock();
            let e = agents.get(instance_id)?;
            (e.info.session_id.clone(), e.tx.clone()?)
        };
        let (ltx, lrx) = mpsc::unbounded_channel();
        if let Some(role) = Role::of_request(&msg) {
            self.listeners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    promotion_id.to_owned(),
                    Waiter {
                        instance_id: instance_id.to_owned(),
                        session_id: session.clone(),
                        role,
                        tx: ltx,
                    },
                );
        }
        tx.send(Ok(ControllerMessage { msg: Some(msg) }))
            .await
            .ok()?;
        Some((session, lrx))
    }

    /// Hands an event that the session `from` sent to whoever waits for
    /// its promotion, when that waiter is bound to this session and the
    /// event fits the role it gave the instance; otherwise says why not.
    pub fn deliver(
        &self,
        from: &SessionHandle,
        promotion_id: &str,
        event: AgentEvent,
    ) -> Result<(), Refused> {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = listeners.get(promotion_id) else {
            return Err(Refused::NobodyWaiting(promotion_id.to_owned()));
        };
        if w.instance_id != from.instance_id {
            return Err(Refused::WrongInstance {
                promotion: promotion_id.to_owned(),
                expected: w.instance_id.clone(),
            });
        }
        if w.session_id != from.session_id {
            return Err(Refused::OtherSession {
                promotion: promotion_id.to_owned(),
            });
        }
        if !w.role.admits(&event) {
            return Err(Refused::WrongRole {
                promotion: promotion_id.to_owned(),
                role: w.role.name(),
                kind: event.kind(),
            });
        }
        // The waiter may have just gone; that is not the sender's fault.
        let _ = w.tx.send(event);
        Ok(())
    }

    pub fn forget(&self, promotion_id: &str) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(promotion_id);
    }

    pub fn list(&self) -> Vec<AgentInfo> {
        let mut v: Vec<AgentInfo> = self.lock().values().map(|e| e.info.clone()).collect();
        v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        v
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(instance: &str, session: &str) -> AgentInfo {
        AgentInfo {
            instance_id: instance.into(),
            session_id: session.into(),
            ..Default::default()
        }
    }

    #[test]
    fn newer_session_replaces_older_and_old_cannot_remove_new() {
        let r = Registry::default();
        let old = r.register(info("i-1", "s1"));
        let new = r.register(info("i-1", "s2"));
        assert_eq!(r.len(), 1);
        r.remove(&old);
        assert_eq!(r.list()[0].session_id, "s2");
        r.remove(&new);
        assert!(r.is_empty());
    }

    fn report(ready: bool) -> AgentEvent {
        AgentEvent::Report(Report {
            promotion_id: "p1".into(),
            ready,
            ..Default::default()
        })
    }

    fn verdict(ok: bool) -> AgentEvent {
        AgentEvent::Verify(VerifyResult {
            promotion_id: "p1/verify".into(),
            ok,
            ..Default::default()
        })
    }

    /// A registered session whose stream the test holds open.
    fn live(
        r: &Registry,
        instance: &str,
        session: &str,
    ) -> (
        SessionHandle,
        mpsc::Receiver<Result<ControllerMessage, Status>>,
    ) {
        let (tx, rx) = mpsc::channel(4);
        (r.register_with(info(instance, session), Some(tx)), rx)
    }

    fn prepare() -> controller_message::Msg {
        controller_message::Msg::Prepare(amiprep_proto::v1::Prepare {
            promotion_id: "p1".into(),
            policy_toml: String::new(),
            fingerprint_key: Vec::new(),
        })
    }

    fn verify() -> controller_message::Msg {
        controller_message::Msg::Verify(amiprep_proto::v1::Verify {
            promotion_id: "p1/verify".into(),
            expectations: None,
            fingerprint_key: Vec::new(),
        })
    }

    #[tokio::test]
    async fn only_the_source_session_reports_for_its_promotion() {
        let r = Registry::default();
        let (source, _s) = live(&r, "i-source", "s1");
        let (other, _o) = live(&r, "i-other", "s2");
        let (_, mut events) = r.request("i-source", "p1", prepare()).await.unwrap();
        assert_eq!(
            r.deliver(&other, "p1", report(true)).unwrap_err().reason(),
            "wrong-instance"
        );
        assert_eq!(
            r.deliver(&source, "p1", verdict(true))
                .unwrap_err()
                .reason(),
            "wrong-role"
        );
        assert_eq!(
            r.deliver(&other, "p2", report(true)).unwrap_err().reason(),
            "nobody-waiting"
        );
        // An earlier session of the source no longer speaks for it.
        let stale = SessionHandle {
            session_id: "s0".into(),
            ..source.clone()
        };
        assert_eq!(
            r.deliver(&stale, "p1", report(true)).unwrap_err().reason(),
            "other-session"
        );
        r.deliver(&source, "p1", report(false)).unwrap();
        match events.try_recv() {
            Ok(AgentEvent::Report(rep)) => assert!(!rep.ready),
            other => panic!("expected the source's report, got {other:?}"),
        }
        assert!(events.try_recv().is_err(), "nothing else was handed over");
    }

    #[tokio::test]
    async fn only_the_canary_session_gives_the_verdict() {
        let r = Registry::default();
        let (source, _s) = live(&r, "i-source", "s1");
        let (canary, _c) = live(&r, "i-canary", "s2");
        let (_, mut events) = r.request("i-canary", "p1/verify", verify()).await.unwrap();
        assert_eq!(
            r.deliver(&source, "p1/verify", verdict(true))
                .unwrap_err()
                .reason(),
            "wrong-instance"
        );
        assert_eq!(
            r.deliver(&canary, "p1/verify", report(true))
                .unwrap_err()
                .reason(),
            "wrong-role"
        );
        r.deliver(&canary, "p1/verify", verdict(false)).unwrap();
        match events.try_recv() {
            Ok(AgentEvent::Verify(v)) => assert!(!v.ok),
            other => panic!("expected the canary's verdict, got {other:?}"),
        }
    }

    #[test]
    fn reap_drops_only_silent_sessions() {
        let r = Registry::default();
        let a = r.register(info("i-a", "s1"));
        std::thread::sleep(Duration::from_millis(30));
        let _b = r.register(info("i-b", "s2"));
        let reaped = r.reap(Duration::from_millis(20));
        assert_eq!(reaped, vec!["i-a".to_string()]);
        assert_eq!(r.list().len(), 1);
        r.heartbeat(&a); // a heartbeat from a dropped session does not resurrect it
        assert_eq!(r.list()[0].instance_id, "i-b");
    }
}
