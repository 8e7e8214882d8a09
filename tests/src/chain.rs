//! Three services A → B → C, each an axum app under `ContextLayer` reading `grpc-timeout`,
//! each calling the next through the reqwest helper with its context.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use reqctx::Cause;
use tokio::sync::mpsc;
use tower_reqctx::header::DeadlineHeader;
use tower_reqctx::propagate::{ClientError, Propagation, ReqwestContextExt};
use tower_reqctx::{ContextLayer, ReqCtx};

use crate::{Probe, ProbeTx, Running, Server, probe};

/// The safety margin each hop takes off the budget it passes on.
pub const MARGIN: Duration = Duration::from_millis(50);

#[derive(Clone)]
struct Hop {
    next: Option<String>,
    started: ProbeTx,
    outbound: mpsc::UnboundedSender<Cause>, // the cause of a failed call downstream
    client: reqwest::Client,
}

/// A calls its `next` with its context; C (no `next`) works until its context ends.
async fn handler(State(hop): State<Hop>, ctx: ReqCtx) -> Response {
    hop.started.send(ctx.0.clone()).unwrap();
    let Some(next) = hop.next else {
        return match ctx.run(std::future::pending::<()>()).await {
            Ok(()) => "unreachable".into_response(),
            Err(cancelled) => cancelled.into_response(),
        };
    };
    let call = hop
        .client
        .get(next)
        .context(&ctx)
        .propagation(Propagation::new().margin(MARGIN))
        .send()
        .await;
    match call {
        Ok(res) => (res.status(), "passed on").into_response(),
        Err(ClientError::Cancelled(cancelled)) => {
            hop.outbound.send(cancelled.cause().clone()).unwrap();
            cancelled.into_response()
        }
        Err(other) => (StatusCode::BAD_GATEWAY, other.to_string()).into_response(),
    }
}

/// The running chain.
#[derive(Debug)]
pub struct Chain {
    services: Vec<Running>, // C, B, A
    /// A's address.
    pub a: SocketAddr,
    /// B's address.
    pub b: SocketAddr,
    /// The contexts of A's, B's and C's handlers as they start.
    pub probes: [Probe; 3],
    /// The causes of failed calls: A's call to B, B's call to C.
    pub outbound: [mpsc::UnboundedReceiver<Cause>; 2],
}

/// Starts C, then B, then A, each under `serve`.
pub async fn chain() -> Chain {
    let client = reqwest::Client::new();
    let mut services = Vec::new();
    let mut next = None;
    let mut probes = Vec::new();
    let mut outbound = Vec::new();
    let mut addrs = Vec::new();
    for _ in ["C", "B", "A"] {
        let (started, p) = probe();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let hop = Hop {
            next: next.take(),
            started,
            outbound: out_tx,
            client: client.clone(),
        };
        let app = Router::new()
            .route("/", get(handler))
            .with_state(hop)
            .layer(ContextLayer::new().deadline_header(DeadlineHeader::grpc()));
        let srv = Running::start(Server::Serve, app, Duration::from_millis(100)).await;
        next = Some(format!("http://{}/", srv.addr));
        addrs.push(srv.addr);
        services.push(srv);
        probes.push(p);
        outbound.push(out_rx);
    }
    let [c, b, a]: [Probe; 3] = probes.try_into().unwrap();
    let [_c_out, b_out, a_out]: [mpsc::UnboundedReceiver<Cause>; 3] = outbound.try_into().unwrap();
    Chain {
        services,
        a: addrs[2],
        b: addrs[1],
        probes: [a, b, c],
        outbound: [a_out, b_out],
    }
}

impl Chain {
    /// Shuts the three services down.
    pub async fn shutdown(self) {
        for s in self.services {
            s.shutdown().await.unwrap();
        }
    }
}
