//! The promotion state machine's states, the kinds of resource a promotion
//! creates, and what `--after` asks for.
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

/// What becomes of the source instance once its image is promoted
/// (`--after`). On failure the source is never terminated; `Start` starts it
/// again there too.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// Leave it stopped (the default).
    #[default]
    Stop,
    /// Start it again.
    Start,
    /// Terminate it.
    Terminate,
}

impl After {
    pub fn as_str(self) -> &'static str {
        match self {
            After::Stop => "stop",
            After::Start => "start",
            After::Terminate => "terminate",
        }
    }

    /// `--after` as the operator spells it; empty means the default.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "stop" => Some(After::Stop),
            "start" => Some(After::Start),
            "terminate" => Some(After::Terminate),
            _ => None,
        }
    }
}

impl fmt::Display for After {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for After {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A kind of cloud resource a promotion creates. Stored as the `as_str` text.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    /// The AMI in the promotion's region.
    Image,
    /// A snapshot of that AMI.
    Snapshot,
    /// The instance launched from the AMI to verify it.
    Canary,
    /// A copy of the AMI in another region.
    Copy,
    /// A snapshot of a copy.
    CopySnapshot,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Image,
        ResourceKind::Snapshot,
        ResourceKind::Canary,
        ResourceKind::Copy,
        ResourceKind::CopySnapshot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Image => "image",
            ResourceKind::Snapshot => "snapshot",
            ResourceKind::Canary => "canary",
            ResourceKind::Copy => "copy",
            ResourceKind::CopySnapshot => "copy-snapshot",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The image kind for `region`: the primary image in the promotion's
    /// own region, a copy elsewhere.
    pub fn image_in(region: &str, home: &str) -> Self {
        if region == home {
            ResourceKind::Image
        } else {
            ResourceKind::Copy
        }
    }

    /// The snapshot kind for `region`, as [`ResourceKind::image_in`].
    pub fn snapshot_in(region: &str, home: &str) -> Self {
        if region == home {
            ResourceKind::Snapshot
        } else {
            ResourceKind::CopySnapshot
        }
    }

    /// An AMI or a snapshot of one (what the `verified` tag goes on).
    pub fn is_image_part(self) -> bool {
        !matches!(self, ResourceKind::Canary)
    }
}

impl fmt::Display for ResourceKind {
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
    fn kinds_and_after_round_trip() {
        for k in ResourceKind::ALL {
            assert_eq!(ResourceKind::parse(k.as_str()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
        for a in [After::Stop, After::Start, After::Terminate] {
            assert_eq!(After::parse(a.as_str()), Some(a));
            assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{a}\""));
        }
        assert_eq!(After::parse(""), Some(After::Stop));
        assert_eq!(After::parse("reboot"), None);
    }

    #[test]
    fn terminal_states_have_no_successor() {
        for s in ALL.into_iter().filter(|s| s.is_terminal()) {
            assert_eq!(s.next(true), None);
        }
    }
}
