//! The registry of connected agents, keyed by verified instance id.

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
    listeners: Mutex<HashMap<String, mpsc::UnboundedSender<AgentEvent>>>,
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
    /// `promotion_id`. Returns the session id used, or `None` when the
    /// instance has no session.
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
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(promotion_id.to_owned(), ltx);
        tx.send(Ok(ControllerMessage { msg: Some(msg) }))
            .await
            .ok()?;
        Some((session, lrx))
    }

    /// Hands an agent's event to whoever waits for its promotion.
    pub fn deliver(&self, promotion_id: &str, event: AgentEvent) {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = listeners.get(promotion_id) {
            let _ = l.send(event);
        }
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
