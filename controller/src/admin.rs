//! `Admin`: the operator API behind the `amiprep` CLI.

use std::{pin::Pin, sync::Arc, time::SystemTime};

use amiprep_proto::v1::{
    AgentInfo, AgentsRequest, AgentsResponse, CancelPromotionRequest, GetPromotionRequest,
    ListPromotionsRequest, ListPromotionsResponse, PromoteRequest, Promotion, PromotionEvent,
    WatchPromotionRequest, admin_server::Admin,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{
    gateway::valid_instance_id,
    naming,
    pipeline::Pipeline,
    registry::Registry,
    store::{PromotionRecord, PromotionSpec},
};

pub struct AdminService {
    pub registry: Arc<Registry>,
    /// `None` when the controller has no `[ec2]` configuration.
    pub pipeline: Option<Arc<Pipeline>>,
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

/// The wire form of a promotion.
pub fn to_proto(rec: &PromotionRecord) -> Promotion {
    Promotion {
        id: rec.id.clone(),
        instance_id: rec.spec.instance_id.clone(),
        state: rec.state.as_str().to_owned(),
        image_name: rec.spec.name.clone(),
        image_id: rec.image().map(|r| r.id.clone()).unwrap_or_default(),
        failure_reason: rec.failure_reason.clone().unwrap_or_default(),
        created_unix_ms: rec.created_ms,
        updated_unix_ms: rec.updated_ms,
        resources: rec
            .resources
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}{}",
                    r.kind,
                    r.region,
                    r.id,
                    if r.deleted { " (removed)" } else { "" }
                )
            })
            .collect(),
        manifest_path: rec.manifest_path.clone().unwrap_or_default(),
        report_json: rec.report_json.clone().unwrap_or_default(),
        report_sha256: rec.report_sha256.clone().unwrap_or_default(),
        last_message: rec.last_message.clone(),
    }
}

/// Validates a request into a spec: every check that needs no cloud call
/// happens here, before anything is recorded.
pub fn spec_from_request(req: &PromoteRequest, id: &str) -> Result<PromotionSpec, Status> {
    if !valid_instance_id(&req.instance_id) {
        return Err(Status::invalid_argument(format!(
            "{:?} is not an EC2 instance id",
            req.instance_id
        )));
    }
    let name = naming::render(
        &req.name_template,
        time::OffsetDateTime::from(SystemTime::now()),
        &req.instance_id,
        id,
    )
    .map_err(Status::invalid_argument)?;
    let Some(after) = crate::state::After::parse(&req.after) else {
        return Err(Status::invalid_argument(format!(
            "--after {:?}: use stop, start or terminate",
            req.after
        )));
    };
    for a in &req.share_with {
        if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Status::invalid_argument(format!(
                "--share-with {a:?} is not a 12-digit AWS account id"
            )));
        }
    }
    let mut tags: Vec<(String, String)> = req
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.sort();
    if let Some((k, _)) = tags
        .iter()
        .find(|(k, _)| k.starts_with("amiprep:") || k.starts_with("aws:"))
    {
        return Err(Status::invalid_argument(format!(
            "--tag {k}: the amiprep: and aws: prefixes are reserved"
        )));
    }
    Ok(PromotionSpec {
        instance_id: req.instance_id.clone(),
        name,
        description: req.description.clone(),
        tags,
        policy_toml: req.policy_toml.clone(),
        copy_to: req
            .copy_to
            .iter()
            .map(|c| (c.region.clone(), c.kms_key_id.clone()))
            .collect(),
        share_with: req.share_with.clone(),
        deprecate_after_days: req.deprecate_after_days,
        after,
        canary: !req.no_canary,
        keep_on_failure: req.keep_on_failure,
    })
}

impl AdminService {
    fn pipeline(&self) -> Result<&Arc<Pipeline>, Status> {
        self.pipeline.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "promotions need EC2 access: add an [ec2] section to the controller configuration",
            )
        })
    }

    fn get(&self, id: &str) -> Result<PromotionRecord, Status> {
        self.pipeline()?
            .store
            .get(id)
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no promotion {id:?}")))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn agents(&self, _: Request<AgentsRequest>) -> Result<Response<AgentsResponse>, Status> {
        let mut agents = self.registry.list();
        // With a shared store: the sessions the other controllers hold too.
        if let Some(p) = &self.pipeline
            && p.store.shared()
        {
            let remote = p
                .store
                .remote_sessions(2 * p.lease_secs())
                .map_err(internal)?;
            agents.extend(remote.into_iter().map(|s| AgentInfo {
                controller: s.controller,
                ..s.info
            }));
        }
        Ok(Response::new(AgentsResponse { agents }))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<Promotion>, Status> {
        let pipeline = self.pipeline()?;
        let req = req.into_inner();
        let id = format!("prm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let spec = spec_from_request(&req, &id)?;
        pipeline.submit(&id, &spec).map_err(internal)?;
        Ok(Response::new(to_proto(&self.get(&id)?)))
    }

    async fn get_promotion(
        &self,
        req: Request<GetPromotionRequest>,
    ) -> Result<Response<Promotion>, Status> {
        Ok(Response::new(to_proto(&self.get(&req.into_inner().id)?)))
    }

    async fn list_promotions(
        &self,
        _: Request<ListPromotionsRequest>,
    ) -> Result<Response<ListPromotionsResponse>, Status> {
        let list = self.pipeline()?.store.list().map_err(internal)?;
        Ok(Response::new(ListPromotionsResponse {
            promotions: list.iter().map(to_proto).collect(),
        }))
    }

    type WatchPromotionStream = Pin<Box<dyn Stream<Item = Result<PromotionEvent, Status>> + Send>>;

    async fn watch_promotion(
        &self,
        req: Request<WatchPromotionRequest>,
    ) -> Result<Response<Self::WatchPromotionStream>, Status> {
        let pipeline = self.pipeline()?.clone();
        let id = req.into_inner().id;
        self.get(&id)?;
        let mut changes = pipeline.changes.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut seq = 0;
            loop {
                let events = match pipeline.store.events(&id, seq) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                };
                for e in events {
                    seq = e.seq;
                    let ev = PromotionEvent {
                        id: id.clone(),
                        state: e.state,
                        message: e.message,
                        at_unix_ms: e.at_ms,
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                match pipeline.store.get(&id) {
                    Ok(Some(r)) if r.state.is_terminal() => return,
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                }
                // Wake on any change, and at least every second.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), changes.recv()).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_promotion(
        &self,
        req: Request<CancelPromotionRequest>,
    ) -> Result<Response<Promotion>, Status> {
        let id = req.into_inner().id;
        let rec = self.get(&id)?;
        if rec.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "promotion {id} already ended ({})",
                rec.state
            )));
        }
        self.pipeline()?.cancel(&id).map_err(internal)?;
        Ok(Response::new(to_proto(&self.get(&id)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> PromoteRequest {
        PromoteRequest {
            instance_id: "i-0123456789abcdef0".into(),
            name_template: "web-{instance}".into(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_request_renders_name_and_defaults() {
        let s = spec_from_request(&req(), "prm-1").unwrap();
        assert_eq!(s.name, "web-i-0123456789abcdef0");
        assert_eq!(s.after, "stop");
        assert!(s.canary);
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_recorded() {
        let mut r = req();
        r.name_template = "x".into();
        assert!(
            spec_from_request(&r, "p")
                .unwrap_err()
                .message()
                .contains("3 to 128")
        );
        let mut r = req();
        r.instance_id = "web01".into();
        assert!(spec_from_request(&r, "p").is_err());
        let mut r = req();
        r.after = "reboot".into();
        assert!(
            spec_from_request(&r, "p")
                .unwrap_err()
                .message()
                .contains("--after")
        );
        let mut r = req();
        r.share_with = vec!["12".into()];
        assert!(spec_from_request(&r, "p").is_err());
        let mut r = req();
        r.tags.insert("amiprep:status".into(), "verified".into());
        assert!(
            spec_from_request(&r, "p")
                .unwrap_err()
                .message()
                .contains("reserved")
        );
    }
}
