//! Which controller drives a promotion, as pure functions over facts (the
//! record, which agent sessions this and the other controllers hold).
//!
//! A step that talks to an agent (waiting for it, prepare, the canary's
//! verify) must run on the controller holding that agent's session: agents
//! connect to whichever controller the load balancer gave them. Every other
//! step runs wherever the lease is.

use std::time::Duration;

use crate::{
    state::{PromotionState, ResourceKind},
    store::PromotionRecord,
};

/// The instance whose agent the promotion's current step talks to.
pub fn needed_agent(rec: &PromotionRecord) -> Option<&str> {
    match rec.state {
        PromotionState::Pending | PromotionState::Preparing => Some(&rec.spec.instance_id),
        PromotionState::VerifyingCanary => rec
            .resources_of(ResourceKind::Canary)
            .filter(|r| !r.deleted)
            .last()
            .map(|r| r.id.as_str()),
        _ => None,
    }
}

/// Where the agent a step needs is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAt<'a> {
    /// No agent is needed, or it is connected here.
    Here,
    /// Connected to this other controller.
    Elsewhere(&'a str),
    /// Connected nowhere (yet).
    Nowhere,
}

/// What a controller should do about a promotion it is not driving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Try to take the lease and drive it.
    Try,
    /// Leave it: another controller holds the agent it needs.
    Leave,
}

/// Whether to try to take a promotion: always, unless its agent is held by
/// another controller (which can take it). A promotion whose agent is
/// connected nowhere is taken by whoever gets the lease, to wait for the
/// agent there (and to time out if it never comes).
pub fn should_take(agent: AgentAt<'_>) -> Take {
    match agent {
        AgentAt::Here | AgentAt::Nowhere => Take::Try,
        AgentAt::Elsewhere(_) => Take::Leave,
    }
}

/// What a driver does at each lease tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// Renewed; go on.
    Drive,
    /// The step needs an agent another controller holds: give the lease
    /// back so that controller can take the promotion.
    HandOver(String),
    /// The lease is gone (expired and taken): stop at once, write nothing.
    Lost,
}

/// The outcome of one tick: `renewed` is the renewal's answer (`None` when
/// the database could not be reached), `unreachable_for` how long renewals
/// have been failing.
pub fn after_tick(
    renewed: Option<bool>,
    unreachable_for: Duration,
    lease: Duration,
    agent: AgentAt<'_>,
) -> Keep {
    match renewed {
        Some(false) => return Keep::Lost,
        // Past the lease time another controller may already drive it.
        None if unreachable_for >= lease => return Keep::Lost,
        _ => {}
    }
    match agent {
        AgentAt::Elsewhere(c) => Keep::HandOver(c.to_owned()),
        AgentAt::Here | AgentAt::Nowhere => Keep::Drive,
    }
}

/// How often a driver renews its lease and the coordinator looks for work:
/// three renewals per lease time, and at least every five seconds so that
/// hand-overs are quick even with long leases.
pub fn tick(lease: Duration) -> Duration {
    (lease / 3)
        .min(Duration::from_secs(5))
        .max(Duration::from_millis(200))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PromotionSpec, Resource};

    fn rec(state: PromotionState, canaries: &[(&str, bool)]) -> PromotionRecord {
        PromotionRecord {
            id: "p".into(),
            spec: PromotionSpec {
                instance_id: "i-source".into(),
                ..Default::default()
            },
            region: "r".into(),
            state,
            failed_in: None,
            failure_reason: None,
            cancel_requested: false,
            report_json: None,
            report_sha256: None,
            manifest_path: None,
            created_ms: 0,
            updated_ms: 0,
            resources: canaries
                .iter()
                .map(|(id, deleted)| Resource {
                    kind: ResourceKind::Canary,
                    region: "r".into(),
                    id: (*id).into(),
                    deleted: *deleted,
                })
                .collect(),
            last_message: String::new(),
        }
    }

    #[test]
    fn the_source_agent_is_needed_until_prepared_and_the_live_canary_while_verifying() {
        for s in crate::state::ALL {
            let r = rec(s, &[("i-old", true), ("i-canary", false)]);
            let want = match s {
                PromotionState::Pending | PromotionState::Preparing => Some("i-source"),
                PromotionState::VerifyingCanary => Some("i-canary"),
                _ => None,
            };
            assert_eq!(needed_agent(&r), want, "{s}");
        }
        // A canary already retired is not waited for.
        let r = rec(PromotionState::VerifyingCanary, &[("i-old", true)]);
        assert_eq!(needed_agent(&r), None);
    }

    #[test]
    fn a_promotion_is_left_to_the_controller_holding_its_agent() {
        assert_eq!(should_take(AgentAt::Here), Take::Try);
        assert_eq!(should_take(AgentAt::Nowhere), Take::Try);
        assert_eq!(should_take(AgentAt::Elsewhere("b")), Take::Leave);
    }

    #[test]
    fn a_driver_stops_when_its_lease_is_gone_and_hands_over_to_the_agent() {
        let lease = Duration::from_secs(15);
        let short = Duration::from_secs(1);
        assert_eq!(
            after_tick(Some(true), short, lease, AgentAt::Here),
            Keep::Drive
        );
        assert_eq!(
            after_tick(Some(true), short, lease, AgentAt::Nowhere),
            Keep::Drive
        );
        assert_eq!(
            after_tick(Some(true), short, lease, AgentAt::Elsewhere("b")),
            Keep::HandOver("b".into())
        );
        assert_eq!(
            after_tick(Some(false), short, lease, AgentAt::Here),
            Keep::Lost
        );
        // A database outage shorter than the lease is ridden out...
        assert_eq!(after_tick(None, short, lease, AgentAt::Here), Keep::Drive);
        // ...a longer one means another controller may be driving.
        assert_eq!(after_tick(None, lease, lease, AgentAt::Here), Keep::Lost);
    }

    #[test]
    fn ticks_are_a_third_of_the_lease_and_never_longer_than_five_seconds() {
        assert_eq!(tick(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(tick(Duration::from_secs(15)), Duration::from_secs(5));
        assert_eq!(tick(Duration::from_secs(600)), Duration::from_secs(5));
        assert_eq!(tick(Duration::from_millis(10)), Duration::from_millis(200));
    }
}
