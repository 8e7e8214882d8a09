//! Runs the guide's tracing step as a user would and reads its log: every cause inside its
//! request's span, a hang-up included; a client's own timeout is not an ERROR, the
//! server's is; the app error type keeps `Cancelled`'s answer.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use reqctx_test_support::{BOUND, http1, read_to_end, send};
use tokio::io::AsyncWriteExt;

struct Program {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Program {
    fn start(exe: &str) -> Program {
        let mut child = Command::new(exe)
            .env("PORT", "0")
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the example runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Program {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line of the log containing every one of `needles` (within [`BOUND`]).
    fn line_with(&mut self, needles: &[&str]) -> String {
        loop {
            match self.lines.recv_timeout(BOUND) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().all(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {needles:?}; the log: {:#?}", self.seen),
            }
        }
    }

    fn addr(&mut self) -> SocketAddr {
        let line = self.line_with(&["listening on http://"]);
        line.rsplit("http://")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn causes_in_the_requests_span() {
    let mut program = Program::start(env!("CARGO_BIN_EXE_example-tracing"));
    let addr = program.addr();

    // The client's own timeout: the handler answers (AppError delegates to Cancelled).
    let request = b"GET /reports/1?timeout=100ms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = read_to_end(&mut send(addr, request).await).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("x-reqctx-deadline: exceeded"), "{answer}");
    // The span's cause is filled before the layer's event, so both lines carry it.
    let span = "request{method=GET uri=/reports/1?timeout=100ms cause=deadline_exceeded}";
    program.line_with(&[
        "DEBUG",
        span,
        "tower_reqctx: request context cancelled",
        "kind=deadline_exceeded",
    ]);
    program.line_with(&[span, "status=504"]);
    let closed = program.line_with(&[span, "close"]);
    assert!(closed.contains("INFO"), "{closed}");

    // The app's own error.
    let (status, _) = http1(
        addr,
        "GET /reports/0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);

    // A hang-up, once the handler has started.
    let mut s = send(addr, b"GET /reports/2 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    program.line_with(&["request{method=GET uri=/reports/2}", "building report 2"]);
    s.shutdown().await.unwrap();
    drop(s);
    program.line_with(&[
        "DEBUG request{method=GET uri=/reports/2 cause=client_disconnected}: tower_reqctx: request context cancelled cause=client disconnected kind=client_disconnected",
    ]);
    program.line_with(&[
        "request{method=GET uri=/reports/2 cause=client_disconnected}",
        "close",
    ]);

    assert!(
        !program.seen.iter().any(|l| l.contains("ERROR")),
        "a client's timeout, a 404 and a hang-up are not errors: {:#?}",
        program.seen
    );
}
