//! A real tonic service over real sockets: code generated from `proto/echo.proto`,
//! tonic's own `Server` with the `ContextLayer` (reading `grpc-timeout`), and tonic's
//! generated client. The handlers reach their request's context through
//! `request_context()` and hand it to the test through a probe.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use reqctx::{Cause, DeadlineOrigin};
use reqctx_tests::{BOUND, Probe, ProbeTx, cause_of, probe};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tower_reqctx::header::DeadlineHeader;
use tower_reqctx::{ContextLayer, request_context};

/// The code generated from `proto/echo.proto`: `pub` items in a private module.
#[allow(unreachable_pub)]
mod pb {
    tonic::include_proto!("reqctx.echo");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{CountRequest, SayReply, SayRequest};

/// The service: every call sends its request's context to the probe first.
struct EchoService {
    probe: ProbeTx,
}

impl EchoService {
    fn probe(&self) -> reqctx::Context {
        let ctx = request_context().expect("no request context: is ContextLayer on the server?");
        self.probe.send(ctx.clone()).unwrap();
        ctx
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, request: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        let ctx = self.probe();
        let SayRequest { text, fail_with } = request.into_inner();
        match (text.as_str(), fail_with) {
            ("park", _) => {
                // Waits for its context: only the client (or a deadline) ends the call.
                ctx.cancelled().await;
                Err(Status::cancelled("the context ended"))
            }
            (_, 0) => Ok(Response::new(SayReply { text })),
            (_, code) => Err(Status::new(Code::from(code), "asked to fail")),
        }
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<SayReply, Status>> + Send>>;

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        self.probe();
        let CountRequest { count, every_ms } = request.into_inner();
        let every = Duration::from_millis(every_ms.into());
        // The first reply at once, the next ones `every` apart.
        let replies = futures_util::stream::unfold(0, move |i| async move {
            if i == count {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(every).await;
            }
            Some((
                Ok(SayReply {
                    text: i.to_string(),
                }),
                i + 1,
            ))
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// tonic's `Server` on 127.0.0.1 with the layer, and a connected client.
struct Grpc {
    client: EchoClient<Channel>,
    probe: Probe,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Grpc {
    async fn start() -> Grpc {
        let (tx, probe) = probe();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .layer(ContextLayer::new().deadline_header(DeadlineHeader::grpc()))
                .add_service(EchoServer::new(EchoService { probe: tx }))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                }),
        );
        let client = timeout(BOUND, EchoClient::connect(format!("http://{addr}")))
            .await
            .expect("the client should connect")
            .unwrap();
        Grpc {
            client,
            probe,
            stop,
            server,
        }
    }

    async fn shutdown(self) {
        drop(self.client);
        let _ = self.stop.send(());
        timeout(BOUND, self.server)
            .await
            .expect("the server should stop")
            .unwrap()
            .unwrap();
    }
}

fn say(text: &str) -> SayRequest {
    SayRequest {
        text: text.to_owned(),
        fail_with: 0,
    }
}

/// A successful unary call ends with HTTP/2 trailers, after which hyper never polls the
/// body again: the context still ends `Completed`, every time.
#[tokio::test]
async fn successful_unary_calls_complete() {
    let mut grpc = Grpc::start().await;
    for i in 0..100 {
        let text = format!("hello {i}");
        let reply = timeout(BOUND, grpc.client.say(say(&text)))
            .await
            .expect("the call should answer")
            .unwrap();
        assert_eq!(reply.into_inner().text, text);
        let ctx = grpc.probe.started().await;
        assert_eq!(cause_of(&ctx).await, Cause::Completed, "call {i}");
    }
    grpc.shutdown().await;
}

/// A server stream that ends (with its trailers) is `Completed`.
#[tokio::test]
async fn a_stream_that_ends_completes() {
    let mut grpc = Grpc::start().await;
    let request = CountRequest {
        count: 5,
        every_ms: 1,
    };
    let mut stream = grpc.client.count(request).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(reply) = timeout(BOUND, stream.message())
        .await
        .expect("the stream should go on")
        .unwrap()
    {
        got.push(reply.text);
    }
    assert_eq!(got, ["0", "1", "2", "3", "4"]);
    let ctx = grpc.probe.started().await;
    assert_eq!(cause_of(&ctx).await, Cause::Completed);
    grpc.shutdown().await;
}

/// A client's `grpc-timeout` that passes while the server streams: the stream ends with
/// trailers carrying `DEADLINE_EXCEEDED` (not an h2 reset, which a tonic client reads as
/// `INTERNAL`), and the context's cause names the header as the deadline's origin.
#[tokio::test]
async fn a_deadline_mid_stream_is_deadline_exceeded() {
    const COUNT: u32 = 40; // 2 s of replies, against a 200 ms deadline
    let mut grpc = Grpc::start().await;
    let mut request = Request::new(CountRequest {
        count: COUNT,
        every_ms: 50,
    });
    request.set_timeout(Duration::from_millis(200)); // sent as `grpc-timeout`
    let mut stream = grpc.client.count(request).await.unwrap().into_inner();
    let mut got = 0;
    let status = loop {
        match timeout(BOUND, stream.message())
            .await
            .expect("the deadline should end the stream")
        {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the stream ended cleanly after {got} replies"),
            Err(status) => break status,
        }
    };
    assert!(got >= 1, "the first reply comes at once");
    assert!(
        got < COUNT,
        "all {got} replies came: the deadline did not cut the stream"
    );
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let ctx = grpc.probe.started().await;
    assert_eq!(
        cause_of(&ctx).await,
        Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Header
        }
    );
    grpc.shutdown().await;
}

/// A client that drops its response stream mid-way resets the HTTP/2 stream
/// (`RST_STREAM`): `ClientDisconnected`.
#[tokio::test]
async fn a_dropped_stream_is_client_disconnected() {
    let mut grpc = Grpc::start().await;
    let request = CountRequest {
        count: 1_000,
        every_ms: 20,
    };
    let mut stream = grpc.client.count(request).await.unwrap().into_inner();
    let first = timeout(BOUND, stream.message())
        .await
        .expect("the first reply should come at once")
        .unwrap();
    assert!(first.is_some());
    drop(stream);
    let ctx = grpc.probe.started().await;
    assert_eq!(cause_of(&ctx).await, Cause::ClientDisconnected);
    grpc.shutdown().await;
}

/// A client that drops a unary call while its handler works resets the HTTP/2 stream:
/// `ClientDisconnected`, and the handler's context wakes it.
#[tokio::test]
async fn a_dropped_unary_call_is_client_disconnected() {
    let mut grpc = Grpc::start().await;
    let call = grpc.client.say(say("park"));
    let ctx = tokio::select! {
        answer = call => panic!("a parked call answered: {answer:?}"),
        ctx = grpc.probe.started() => ctx,
    };
    // The call future is dropped here, its handler parked.
    assert_eq!(cause_of(&ctx).await, Cause::ClientDisconnected);
    grpc.shutdown().await;
}

/// A failed unary call (the handler returns `Err(Status)`): tonic answers trailers-only,
/// with no body to send. Whatever else it reads (`Completed` today), the client did not
/// leave.
#[tokio::test]
async fn a_failed_unary_call_is_not_client_disconnected() {
    let mut grpc = Grpc::start().await;
    let request = SayRequest {
        text: "fail".to_owned(),
        fail_with: Code::NotFound as i32,
    };
    let status = timeout(BOUND, grpc.client.say(request))
        .await
        .expect("the call should answer")
        .expect_err("the handler fails");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let ctx = grpc.probe.started().await;
    let cause = cause_of(&ctx).await;
    assert_ne!(cause, Cause::ClientDisconnected);
    grpc.shutdown().await;
}

/// grpc-web over HTTP/1.1, with tonic-web on both sides and the `ContextLayer` outside
/// tonic-web's translation (so the layer sees grpc-web): a deadline that cuts a server
/// stream ends it with a grpc-web trailer frame carrying `DEADLINE_EXCEEDED` in the body
/// (HTTP/1 has no trailers to carry it), never a clean end without a status.
#[tokio::test]
async fn a_deadline_cuts_a_grpc_web_stream_with_a_status() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tonic_web::{GrpcWebClientLayer, GrpcWebLayer};

    let (tx, mut probe) = probe();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .accept_http1(true)
            .layer(ContextLayer::new().deadline_header(DeadlineHeader::grpc()))
            .layer(GrpcWebLayer::new())
            .add_service(EchoServer::new(EchoService { probe: tx }))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let web = tower::ServiceBuilder::new()
        .layer(GrpcWebClientLayer::new())
        .service(http1);
    let mut client = EchoClient::with_origin(web, format!("http://{addr}").parse().unwrap());

    const COUNT: u32 = 40; // 2 s of replies, against a 200 ms deadline
    let mut request = Request::new(CountRequest {
        count: COUNT,
        every_ms: 50,
    });
    request.set_timeout(Duration::from_millis(200));
    let mut stream = timeout(BOUND, client.count(request))
        .await
        .expect("the call should answer")
        .unwrap()
        .into_inner();
    let mut got = 0;
    let status = loop {
        match timeout(BOUND, stream.message())
            .await
            .expect("the deadline should end the stream")
        {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the stream ended cleanly after {got} replies, with no status"),
            Err(status) => break status,
        }
    };
    assert!((1..COUNT).contains(&got), "{got} replies");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        cause_of(&probe.started().await).await,
        Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Header
        }
    );
    let _ = stop.send(());
    let _ = timeout(BOUND, server).await;
}
