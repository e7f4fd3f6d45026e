//! `Admin`: the operator API behind the `amiprep` CLI.

use std::{pin::Pin, sync::Arc};

use amiprep_proto::v1::{
    AgentsRequest, AgentsResponse, CancelPromotionRequest, GetPromotionRequest,
    ListPromotionsRequest, ListPromotionsResponse, PromoteRequest, Promotion, PromotionEvent,
    WatchPromotionRequest, admin_server::Admin,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::registry::Registry;

pub struct AdminService {
    pub registry: Arc<Registry>,
}

const NO_PIPELINE: &str = "promotions are not available in this controller version";

#[tonic::async_trait]
impl Admin for AdminService {
    async fn agents(&self, _: Request<AgentsRequest>) -> Result<Response<AgentsResponse>, Status> {
        Ok(Response::new(AgentsResponse {
            agents: self.registry.list(),
        }))
    }

    async fn promote(&self, _: Request<PromoteRequest>) -> Result<Response<Promotion>, Status> {
        Err(Status::unimplemented(NO_PIPELINE))
    }

    async fn get_promotion(
        &self,
        _: Request<GetPromotionRequest>,
    ) -> Result<Response<Promotion>, Status> {
        Err(Status::unimplemented(NO_PIPELINE))
    }

    async fn list_promotions(
        &self,
        _: Request<ListPromotionsRequest>,
    ) -> Result<Response<ListPromotionsResponse>, Status> {
        Err(Status::unimplemented(NO_PIPELINE))
    }

    type WatchPromotionStream = Pin<Box<dyn Stream<Item = Result<PromotionEvent, Status>> + Send>>;

    async fn watch_promotion(
        &self,
        _: Request<WatchPromotionRequest>,
    ) -> Result<Response<Self::WatchPromotionStream>, Status> {
        Err(Status::unimplemented(NO_PIPELINE))
    }

    async fn cancel_promotion(
        &self,
        _: Request<CancelPromotionRequest>,
    ) -> Result<Response<Promotion>, Status> {
        Err(Status::unimplemented(NO_PIPELINE))
    }
}
