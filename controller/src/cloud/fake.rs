//! An in-memory [`Cloud`] for unit tests, with the EC2 behaviour moto lacks:
//! images stay `pending` (and their snapshots `pending`) for a few polls,
//! stopping instances pass through `stopping`, a lookup by tag or name does
//! not see a resource until a few lookups after its creation (eventual
//! consistency), client tokens return the first answer, and throttling can be
//! injected. A test can also make a call act and then panic, which stands
//! for a controller killed after EC2 acted but before it recorded the answer.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
};

use super::{
    Cloud, CloudError, ImageFacts, ImageState, InstanceFacts, InstanceHealth, InstanceState,
    SnapshotState, Tags,
};

/// How slow the fake cloud is, in polls (describe calls of that resource).
#[derive(Debug, Clone)]
pub struct FakeTimings {
    /// DescribeImages of a new image answers `pending` this many times.
    pub image_pending_polls: u32,
    /// DescribeInstances of a stopping instance answers `stopping` this many times.
    pub stop_polls: u32,
    /// A new instance's status checks are not `ok` for this many polls.
    pub boot_polls: u32,
    /// Lookups by tag or name miss a new resource this many times.
    pub lookup_lag: u32,
}

impl Default for FakeTimings {
    fn default() -> Self {
        FakeTimings {
            image_pending_polls: 2,
            stop_polls: 2,
            boot_polls: 1,
            lookup_lag: 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeInstance {
    pub region: String,
    pub state: InstanceState,
    pub tags: Vec<(String, String)>,
    pub image_id: Option<String>,
    polls: u32,
    lookups_missed: u32,
}

#[derive(Debug, Clone)]
pub struct FakeImage {
    pub region: String,
    pub name: String,
    pub state: ImageState,
    pub snapshot_ids: Vec<String>,
    pub tags: Vec<(String, String)>,
    /// Fails instead of becoming available.
    pub fails: bool,
    polls: u32,
    lookups_missed: u32,
}

#[derive(Debug, Clone)]
pub struct FakeSnapshot {
    pub region: String,
    pub state: SnapshotState,
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct World {
    timings: FakeTimings,
    instances: BTreeMap<String, FakeInstance>,
    images: BTreeMap<String, FakeImage>,
    snapshots: BTreeMap<String, FakeSnapshot>,
    tokens: HashMap<String, String>,
    next_id: u64,
    calls: Vec<&'static str>,
    throttle: u32,
    panic_at_call: Option<usize>,
    crashed: bool,
    fail_next_image: bool,
}

/// The fake cloud. Every method is synchronous underneath; nothing sleeps.
#[derive(Debug, Default)]
pub struct FakeCloud {
    world: Mutex<World>,
}

impl FakeCloud {
    pub fn new(timings: FakeTimings) -> Self {
        FakeCloud {
            world: Mutex::new(World {
                timings,
                ..World::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a running instance (a promotion's source).
    pub fn add_instance(&self, region: &str, id: &str) {
        self.lock().instances.insert(
            id.to_owned(),
            FakeInstance {
                region: region.to_owned(),
                state: InstanceState::Running,
                tags: Vec::new(),
                image_id: None,
                polls: 0,
                lookups_missed: u32::MAX,
            },
        );
    }

    /// The next `n` calls fail with [`CloudError::Throttled`].
    pub fn throttle(&self, n: u32) {
        self.lock().throttle = n;
    }

    /// Call number `n` (counting from 1, over all calls so far) acts, then
    /// panics — the caller never sees EC2's answer.
    pub fn panic_at_call(&self, n: usize) {
        self.lock().panic_at_call = Some(n);
    }

    /// Whether the injected crash happened.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The next image created ends `failed` instead of `available`.
    pub fn fail_next_image(&self) {
        self.lock().fail_next_image = true;
    }

    /// How many calls were made, in all.
    pub fn call_count(&self) -> usize {
        self.lock().calls.len()
    }

    /// How many calls of `action` (e.g. `CreateImage`) were made.
    pub fn calls_of(&self, action: &str) -> usize {
        self.lock().calls.iter().filter(|c| **c == action).count()
    }

    pub fn instances(&self) -> BTreeMap<String, FakeInstance> {
        self.lock().instances.clone()
    }

    pub fn images(&self) -> BTreeMap<String, FakeImage> {
        self.lock().images.clone()
    }

    pub fn snapshots(&self) -> BTreeMap<String, FakeSnapshot> {
        self.lock().snapshots.clone()
    }

    pub fn instance_state(&self, id: &str) -> Option<InstanceState> {
        self.lock().instances.get(id).map(|i| i.state.clone())
    }

    /// Counts the call, applies injected throttling; runs `f`; then panics
    /// if this was the call chosen to crash on.
    fn call<T>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut World) -> Result<T, CloudError>,
    ) -> Result<T, CloudError> {
        let (out, crash) = {
            let mut w = self.lock();
            w.calls.push(action);
            let n = w.calls.len();
            if w.throttle > 0 {
                w.throttle -= 1;
                return Err(CloudError::Throttled {
                    action,
                    message: "Rate exceeded (injected)".into(),
                });
            }
            let out = f(&mut w);
            let crash = w.panic_at_call == Some(n);
            if crash {
                w.panic_at_call = None;
                w.crashed = true;
            }
            (out, crash)
        };
        if crash {
            panic!("fake cloud: crash injected after {action}");
        }
        out
    }
}

impl World {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{:08x}", self.next_id)
    }

    fn describe_instance(&mut self, id: &str) -> Option<InstanceFacts> {
        let i = self.instances.get_mut(id)?;
        match i.state {
            InstanceState::Stopping | InstanceState::Pending | InstanceState::ShuttingDown => {
                if i.polls == 0 {
                    i.state = match i.state {
                        InstanceState::Stopping => InstanceState::Stopped,
                        InstanceState::Pending => InstanceState::Running,
                        _ => InstanceState::Terminated,
                    };
                } else {
                    i.polls -= 1;
                }
            }
            _ => {}
        }
        Some(InstanceFacts {
            instance_id: id.to_owned(),
            state: i.state.clone(),
            owner_account: Some("123456789012".into()),
        })
    }

    fn image_facts(&self, id: &str, i: &FakeImage) -> ImageFacts {
        ImageFacts {
            image_id: id.to_owned(),
            name: i.name.clone(),
            state: i.state.clone(),
            state_reason: i
                .fails
                .then(|| "snapshot creation failed (injected)".to_owned()),
            root_device_name: Some("/dev/xvda".into()),
            snapshot_ids: i.snapshot_ids.clone(),
            ena_support: Some(true),
            boot_mode: Some("uefi".into()),
            encrypted: false,
            tags: i.tags.clone(),
        }
    }

    fn describe_image(&mut self, id: &str) -> Option<ImageFacts> {
        let i = self.images.get_mut(id)?;
        if i.state == ImageState::Pending {
            if i.polls == 0 {
                i.state = if i.fails {
                    ImageState::Failed
                } else {
                    ImageState::Available
                };
                let done = i.state == ImageState::Available;
                for s in i.snapshot_ids.clone() {
                    if let Some(snap) = self.snapshots.get_mut(&s)
                        && done
                    {
                        snap.state = SnapshotState::Completed;
                    }
                }
            } else {
                i.polls -= 1;
            }
        }
        let i = self.images.get(id)?;
        Some(self.image_facts(id, i))
    }

    fn create_image(
        &mut self,
        region: &str,
        instance_id: &str,
        name: &str,
        tags: &Tags,
    ) -> Result<String, CloudError> {
        if !self
            .instances
            .get(instance_id)
            .is_some_and(|i| i.region == region && !i.state.is_gone())
        {
            return Err(CloudError::NotFound {
                action: "CreateImage",
                message: format!("InvalidInstanceID.NotFound: {instance_id}"),
            });
        }
        if self
            .images
            .values()
            .any(|i| i.region == region && i.name == name && i.state != ImageState::Deregistered)
        {
            return Err(CloudError::NameTaken {
                action: "CreateImage",
                message: format!("InvalidAMIName.Duplicate: {name}"),
            });
        }
        Ok(self.new_image(region, name, tags))
    }

    fn new_image(&mut self, region: &str, name: &str, tags: &Tags) -> String {
        let id = self.id("ami");
        let snap = self.id("snap");
        self.snapshots.insert(
            snap.clone(),
            FakeSnapshot {
                region: region.to_owned(),
                state: SnapshotState::Pending,
                tags: Vec::new(),
            },
        );
        let fails = std::mem::take(&mut self.fail_next_image);
        self.images.insert(
            id.clone(),
            FakeImage {
                region: region.to_owned(),
                name: name.to_owned(),
                state: ImageState::Pending,
                snapshot_ids: vec![snap],
                tags: tags.to_vec(),
                fails,
                polls: self.timings.image_pending_polls,
                lookups_missed: 0,
            },
        );
        id
    }
}

fn has_tag(tags: &[(String, String)], key: &str, value: &str) -> bool {
    tags.iter().any(|(k, v)| k == key && v == value)
}

/// A lookup sees a resource only after `lag` lookups have missed it.
fn visible(missed: &mut u32, lag: u32) -> bool {
    if *missed >= lag {
        true
    } else {
        *missed += 1;
        false
    }
}

#[tonic::async_trait]
impl Cloud for FakeCloud {
    async fn describe_instance(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceFacts>, CloudError> {
        self.call("DescribeInstances", |w| {
            Ok(w.describe_instance(instance_id)
                .filter(|_| w.instances[instance_id].region == region))
        })
    }

    async fn stop_instance(&self, _region: &str, instance_id: &str) -> Result<(), CloudError> {
        self.call("StopInstances", |w| {
            let polls = w.timings.stop_polls;
            let i = w
                .instances
                .get_mut(instance_id)
                .ok_or(CloudError::NotFound {
                    action: "StopInstances",
                    message: instance_id.to_owned(),
                })?;
            if matches!(i.state, InstanceState::Running | InstanceState::Pending) {
                i.state = InstanceState::Stopping;
                i.polls = polls;
            }
            Ok(())
        })
    }

    async fn start_instance(&self, _region: &str, instance_id: &str) -> Result<(), CloudError> {
        self.call("StartInstances", |w| {
            if let Some(i) = w.instances.get_mut(instance_id)
                && i.state == InstanceState::Stopped
            {
                i.state = InstanceState::Pending;
                i.polls = 0;
            }
            Ok(())
        })
    }

    async fn terminate_instance(&self, _region: &str, instance_id: &str) -> Result<(), CloudError> {
        self.call("TerminateInstances", |w| {
            if let Some(i) = w.instances.get_mut(instance_id)
                && !i.state.is_gone()
            {
                i.state = InstanceState::ShuttingDown;
                i.polls = 0;
            }
            Ok(())
        })
    }

    async fn instance_health(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceHealth>, CloudError> {
        self.call("DescribeInstanceStatus", |w| {
            let Some(f) = w.describe_instance(instance_id) else {
                return Ok(None);
            };
            let i = w
                .instances
                .get_mut(instance_id)
                .filter(|i| i.region == region);
            let Some(i) = i else { return Ok(None) };
            let status_ok = if f.state == InstanceState::Running && i.polls > 0 {
                i.polls -= 1;
                false
            } else {
                f.state == InstanceState::Running
            };
            Ok(Some(InstanceHealth {
                state: f.state,
                status_ok,
            }))
        })
    }

    async fn create_image(
        &self,
        region: &str,
        instance_id: &str,
        name: &str,
        _description: &str,
        tags: &Tags,
    ) -> Result<String, CloudError> {
        self.call("CreateImage", |w| {
            w.create_image(region, instance_id, name, tags)
        })
    }

    async fn describe_image(
        &self,
        region: &str,
        image_id: &str,
    ) -> Result<Option<ImageFacts>, CloudError> {
        self.call("DescribeImages", |w| {
            Ok(w.describe_image(image_id)
                .filter(|_| w.images[image_id].region == region))
        })
    }

    async fn find_images(
        &self,
        region: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<ImageFacts>, CloudError> {
        self.call("DescribeImages", |w| {
            let lag = w.timings.lookup_lag;
            let mut ids = Vec::new();
            for (id, i) in w.images.iter_mut() {
                if i.region == region
                    && i.state != ImageState::Deregistered
                    && has_tag(&i.tags, key, value)
                    && visible(&mut i.lookups_missed, lag)
                {
                    ids.push(id.clone());
                }
            }
            Ok(ids
                .iter()
                .map(|id| w.image_facts(id, &w.images[id]))
                .collect())
        })
    }

    async fn find_image_by_name(
        &self,
        region: &str,
        name: &str,
    ) -> Result<Option<ImageFacts>, CloudError> {
        self.call("DescribeImages", |w| {
            let lag = w.timings.lookup_lag;
            let found = w
                .images
                .iter_mut()
                .find(|(_, i)| {
                    i.region == region && i.name == name && i.state != ImageState::Deregistered
                })
                .filter(|(_, i)| i.lookups_missed >= lag)
                .map(|(id, _)| id.clone());
            Ok(found.map(|id| w.image_facts(&id, &w.images[&id])))
        })
    }

    async fn snapshot_states(
        &self,
        _region: &str,
        snapshot_ids: &[String],
    ) -> Result<Vec<(String, SnapshotState)>, CloudError> {
        self.call("DescribeSnapshots", |w| {
            Ok(snapshot_ids
                .iter()
                .filter_map(|id| w.snapshots.get(id).map(|s| (id.clone(), s.state.clone())))
                .collect())
        })
    }

    async fn deregister_image(&self, _region: &str, image_id: &str) -> Result<(), CloudError> {
        self.call("DeregisterImage", |w| {
            w.images.remove(image_id);
            Ok(())
        })
    }

    async fn delete_snapshot(&self, _region: &str, snapshot_id: &str) -> Result<(), CloudError> {
        self.call("DeleteSnapshot", |w| {
            if w.images
                .values()
                .any(|i| i.snapshot_ids.iter().any(|s| s == snapshot_id))
            {
                return Err(CloudError::Other {
                    action: "DeleteSnapshot",
                    message: format!("InvalidSnapshot.InUse: {snapshot_id} is in use by an AMI"),
                });
            }
            w.snapshots.remove(snapshot_id);
            Ok(())
        })
    }

    async fn run_instance(
        &self,
        region: &str,
        image_id: &str,
        _instance_type: &str,
        tags: &Tags,
        client_token: &str,
    ) -> Result<String, CloudError> {
        self.call("RunInstances", |w| {
            if let Some(id) = w.tokens.get(client_token) {
                return Ok(id.clone());
            }
            if !w
                .images
                .get(image_id)
                .is_some_and(|i| i.state == ImageState::Available)
            {
                return Err(CloudError::NotFound {
                    action: "RunInstances",
                    message: format!("InvalidAMIID.Unavailable: {image_id}"),
                });
            }
            let id = w.id("i");
            let boot = w.timings.boot_polls;
            w.instances.insert(
                id.clone(),
                FakeInstance {
                    region: region.to_owned(),
                    state: InstanceState::Pending,
                    tags: tags.to_vec(),
                    image_id: Some(image_id.to_owned()),
                    polls: boot,
                    lookups_missed: 0,
                },
            );
            w.tokens.insert(client_token.to_owned(), id.clone());
            Ok(id)
        })
    }

    async fn find_instances(
        &self,
        region: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<InstanceFacts>, CloudError> {
        self.call("DescribeInstances", |w| {
            let lag = w.timings.lookup_lag;
            let mut out = Vec::new();
            for (id, i) in w.instances.iter_mut() {
                if i.region == region
                    && i.state != InstanceState::Terminated
                    && has_tag(&i.tags, key, value)
                    && visible(&mut i.lookups_missed, lag)
                {
                    out.push(InstanceFacts {
                        instance_id: id.clone(),
                        state: i.state.clone(),
                        owner_account: Some("123456789012".into()),
                    });
                }
            }
            Ok(out)
        })
    }

    async fn copy_image(
        &self,
        source_region: &str,
        image_id: &str,
        region: &str,
        name: &str,
        _description: &str,
        _kms_key_id: Option<&str>,
        client_token: &str,
    ) -> Result<String, CloudError> {
        self.call("CopyImage", |w| {
            if let Some(id) = w.tokens.get(client_token) {
                return Ok(id.clone());
            }
            if !w
                .images
                .get(image_id)
                .is_some_and(|i| i.region == source_region && i.state == ImageState::Available)
            {
                return Err(CloudError::NotFound {
                    action: "CopyImage",
                    message: format!("InvalidAMIID.Unavailable: {image_id}"),
                });
            }
            // CopyImage does not copy tags.
            let id = w.new_image(region, name, &[]);
            w.tokens.insert(client_token.to_owned(), id.clone());
            Ok(id)
        })
    }

    async fn create_tags(
        &self,
        _region: &str,
        resource_ids: &[String],
        tags: &Tags,
    ) -> Result<(), CloudError> {
        self.call("CreateTags", |w| {
            for id in resource_ids {
                let target = if let Some(i) = w.images.get_mut(id) {
                    &mut i.tags
                } else if let Some(s) = w.snapshots.get_mut(id) {
                    &mut s.tags
                } else if let Some(i) = w.instances.get_mut(id) {
                    &mut i.tags
                } else {
                    return Err(CloudError::NotFound {
                        action: "CreateTags",
                        message: format!("{id} does not exist"),
                    });
                };
                for (k, v) in tags {
                    target.retain(|(tk, _)| tk != k);
                    target.push((k.clone(), v.clone()));
                }
            }
            Ok(())
        })
    }

    async fn share_image(
        &self,
        _region: &str,
        _image_id: &str,
        _accounts: &[String],
    ) -> Result<(), CloudError> {
        self.call("ModifyImageAttribute", |_| Ok(()))
    }

    async fn deprecate_image(
        &self,
        _region: &str,
        _image_id: &str,
        _at: std::time::SystemTime,
    ) -> Result<(), CloudError> {
        self.call("EnableImageDeprecation", |_| Ok(()))
    }
}
