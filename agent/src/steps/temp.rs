//! temp: the contents of /tmp, /var/tmp and the crash and core dump
//! directories (the directories themselves stay, with their modes).

use super::{Ctx, Plan, Step, plan_contents};

pub struct Temp;

impl Step for Temp {
    fn name(&self) -> &'static str {
        "temp"
    }

    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let mut plan = Plan::default();
        for dir in &cx.policy.temp.dirs {
            plan_contents(cx, dir, &[], &mut plan);
        }
        plan
    }
}
