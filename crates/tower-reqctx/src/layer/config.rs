//! The settings of a [`ContextLayer`](crate::ContextLayer), shared by its services.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use reqctx::Context;

use crate::wire::ClampPolicy;
use crate::wire::header::DeadlineHeader;

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) role: Role,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_timeout: Option<Duration>,
    pub(crate) policy: ClampPolicy,
    pub(crate) query_param: Option<&'static str>,
    pub(crate) timeout_status: StatusCode,
    pub(crate) grace: Duration,
    pub(crate) root: Option<Context>,
    pub(crate) deadline_headers: Arc<[DeadlineHeader]>, // read in order; the earliest wins
    pub(crate) request_id: Option<HeaderName>,
    #[cfg(feature = "live")]
    pub(crate) live: Option<Arc<crate::live::Registry>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            role: Role::Owner,
            timeout: None,
            max_timeout: None,
            policy: ClampPolicy::Clamp,
            query_param: Some("timeout"),
            timeout_status: StatusCode::GATEWAY_TIMEOUT,
            grace: Duration::ZERO,
            root: None,
            deadline_headers: Arc::new([]),
            request_id: None,
            #[cfg(feature = "live")]
            live: None,
        }
    }
}

/// Which layer made the service.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    /// `ContextLayer`: makes the request's context and owns it.
    Owner,
    /// `RouteTimeout`: replaces the owner's server timeout (`None`: no timeout); the
    /// other settings are not read.
    Route(Option<Duration>),
}
