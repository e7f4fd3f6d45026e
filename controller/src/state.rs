//! The promotion state machine: states, and the pure decisions between them.
//!
//! A promotion moves forward through these states; each is persisted before
//! the cloud call that follows it, so a restarted controller resumes at the
//! recorded state and re-runs its (idempotent) step.

use std::fmt;

/// Where a promotion is. Stored as the `as_str` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromotionState {
    /// Accepted; waiting for the source instance's agent.
    Pending,
    /// `Prepare` sent to the agent; waiting for its readiness report.
    Preparing,
    /// Stopping the source instance.
    Stopping,
    /// Creating the image (looked up by tag first, so never twice).
    CreatingImage,
    /// Image id recorded; waiting for `available`.
    AwaitingImage,
    /// Checking image facts (state, root device, snapshots).
    VerifyingImage,
    /// Launching the canary instance from the image.
    LaunchingCanary,
    /// Canary launched; waiting for it to run and for its agent's verdict.
    VerifyingCanary,
    /// Copying to other regions, sharing, deprecation time.
    Distributing,
    /// Tagging as verified and writing the manifest.
    Promoting,
    /// Done.
    Promoted,
    /// Removing what this promotion created, after a failure or a cancel.
    CleaningUp,
    /// Ended unsuccessfully; `failure_reason` says why.
    Failed,
    /// Ended by `amiprep cancel`.
    Cancelled,
}

pub const ALL: [PromotionState; 14] = [
    PromotionState::Pending,
    PromotionState::Preparing,
    PromotionState::Stopping,
    PromotionState::CreatingImage,
    PromotionState::AwaitingImage,
    PromotionState::VerifyingImage,
    PromotionState::LaunchingCanary,
    PromotionState::VerifyingCanary,
    PromotionState::Distributing,
    PromotionState::Promoting,
    PromotionState::Promoted,
    PromotionState::CleaningUp,
    PromotionState::Failed,
    PromotionState::Cancelled,
];

impl PromotionState {
    pub fn as_str(self) -> &'static str {
        match self {
            PromotionState::Pending => "pending",
            PromotionState::Preparing => "preparing",
            PromotionState::Stopping => "stopping",
            PromotionState::CreatingImage => "creating-image",
            PromotionState::AwaitingImage => "awaiting-image",
            PromotionState::VerifyingImage => "verifying-image",
            PromotionState::LaunchingCanary => "launching-canary",
            PromotionState::VerifyingCanary => "verifying-canary",
            PromotionState::Distributing => "distributing",
            PromotionState::Promoting => "promoting",
            PromotionState::Promoted => "promoted",
            PromotionState::CleaningUp => "cleaning-up",
            PromotionState::Failed => "failed",
            PromotionState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PromotionState::Promoted | PromotionState::Failed | PromotionState::Cancelled
        )
    }

    /// The state after this one succeeds, given whether a canary runs.
    pub fn next(self, canary: bool) -> Option<Self> {
        use PromotionState::*;
        Some(match self {
            Pending => Preparing,
            Preparing => Stopping,
            Stopping => CreatingImage,
            CreatingImage => AwaitingImage,
            AwaitingImage => VerifyingImage,
            VerifyingImage if canary => LaunchingCanary,
            VerifyingImage => Distributing,
            LaunchingCanary => VerifyingCanary,
            VerifyingCanary => Distributing,
            Distributing => Promoting,
            Promoting => Promoted,
            Promoted | CleaningUp | Failed | Cancelled => return None,
        })
    }
}

impl fmt::Display for PromotionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in ALL {
            assert_eq!(PromotionState::parse(s.as_str()), Some(s));
        }
        assert_eq!(PromotionState::parse("bogus"), None);
    }

    #[test]
    fn happy_path_reaches_promoted_with_and_without_canary() {
        for canary in [true, false] {
            let mut s = PromotionState::Pending;
            let mut seen = vec![s];
            while let Some(n) = s.next(canary) {
                s = n;
                seen.push(s);
            }
            assert_eq!(s, PromotionState::Promoted);
            assert_eq!(seen.contains(&PromotionState::LaunchingCanary), canary);
            assert!(seen.iter().all(|s| !matches!(s, PromotionState::Failed)));
        }
    }

    #[test]
    fn terminal_states_have_no_successor() {
        for s in ALL.into_iter().filter(|s| s.is_terminal()) {
            assert_eq!(s.next(true), None);
        }
    }
}
