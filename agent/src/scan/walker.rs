//! The scanner's view of the agent's one safe walker (`crate::safefs`): the
//! scanner walks with it and nothing else.

pub(crate) use crate::safefs::{Control, Event, Kind, Root, WalkOptions, walk};
