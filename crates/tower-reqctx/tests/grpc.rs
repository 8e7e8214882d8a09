//! A tonic unary call through `ContextLayer` with `DeadlineHeader::grpc()`: the handler's
//! context deadline comes from the client's `grpc-timeout`. The service is written by hand
//! (no protoc, no codegen), over a codec of raw bytes.
#![cfg(feature = "axum")]

use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context as Cx, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tower::{Layer, Service};
use tower_reqctx::header::DeadlineHeader;
use tower_reqctx::reqctx::{Cause, Context, DeadlineOrigin};
use tower_reqctx::{ContextLayer, request_context, serve};

use reqctx_test_support::{BOUND, spawn_server};

/// Messages are their bytes, as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What the handler saw: its context's remaining budget at the start, and the cause it
/// ended with.
#[derive(Debug)]
struct Seen {
    remaining: Option<Duration>,
    cause: Option<Cause>,
}

/// `/test.Waiter/Wait`: waits for its request context, then answers `DEADLINE_EXCEEDED`;
/// reports what it saw.
#[derive(Clone)]
struct Waiter {
    seen: mpsc::UnboundedSender<Seen>,
}

/// The unary method, with the request's context taken from the HTTP request.
struct Wait {
    ctx: Context,
    seen: mpsc::UnboundedSender<Seen>,
}

impl tonic::server::UnaryService<Bytes> for Wait {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, Status>> + Send>>;

    fn call(&mut self, _: tonic::Request<Bytes>) -> Self::Future {
        let ctx = self.ctx.clone();
        let seen = self.seen.clone();
        let remaining = ctx.remaining();
        // Reports from a task of its own: the layer drops this future when it answers the
        // expired deadline.
        let waiter = ctx.clone();
        tokio::spawn(async move {
            waiter.cancelled().await;
            let _ = seen.send(Seen {
                remaining,
                cause: waiter.cause(),
            });
        });
        Box::pin(async move {
            ctx.cancelled().await;
            Err(Status::deadline_exceeded("the context ended"))
        })
    }
}

impl<B> Service<http::Request<B>> for Waiter
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Cx<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ctx = request_context().expect("no request context: is ContextLayer in front?");
        let method = Wait {
            ctx,
            seen: self.seen.clone(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(method, req).await)
        })
    }
}

#[tokio::test]
async fn grpc_timeout_sets_the_handler_deadline() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let app = ContextLayer::new()
        .timeout(Duration::from_secs(30))
        .deadline_header(DeadlineHeader::grpc())
        .layer(Waiter { seen: seen_tx });
    let (addr, server) = spawn_server(|l| serve(l, app).into_future()).await;

    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build::<_, tonic::body::Body>(HttpConnector::new());
    let origin = format!("http://{addr}").parse().unwrap();
    let mut grpc = tonic::client::Grpc::with_origin(client, origin);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Bytes::from_static(b"hi"));
    request.set_timeout(Duration::from_millis(200)); // sent as `grpc-timeout`
    let start = Instant::now();
    let answer = timeout(
        BOUND,
        grpc.unary::<Bytes, Bytes, _>(
            request,
            PathAndQuery::from_static("/test.Waiter/Wait"),
            RawCodec,
        ),
    )
    .await
    .expect("no answer within the bound");
    let status = answer.expect_err("the call cannot succeed");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    let seen = timeout(BOUND, seen.recv()).await.unwrap().unwrap();
    assert_eq!(
        seen.cause,
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Header
        })
    );
    // Bounds from what the test set, not from loopback speed: the handler's budget is at
    // most the 200 ms the client sent (not the layer's 30 s), and the answer came no
    // sooner than that budget allows (10 ms for the header's rounding and the timer).
    let remaining = seen.remaining.expect("the context has a deadline");
    assert!(remaining <= Duration::from_millis(200), "{remaining:?}");
    assert!(start.elapsed() >= Duration::from_millis(190));

    server.abort();
}
