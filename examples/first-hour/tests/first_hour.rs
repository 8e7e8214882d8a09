//! Follows the guide's first hour: runs the program as a user would (`cargo run`), sends
//! the requests the guide sends, and reads what its log says.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use reqctx_test_support::{BOUND, http_get, send};
use tokio::io::AsyncWriteExt;

/// The program, running, and the lines of its log as they come.
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
                println!("{line}"); // what the user sees
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
        let addr = line.rsplit("http://").next().unwrap();
        addr.trim().parse().expect("an address")
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_first_hour() {
    let mut program = Program::start(env!("CARGO_BIN_EXE_example-first-hour"));
    let addr = program.addr();

    // The client's own budget: a 504 at 100 ms, and the cause in the log.
    let (status, body) = http_get(addr, "/report?timeout=100ms").await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("deadline exceeded"), "{body}");
    program.line_with(&[
        "DEBUG",
        "tower_reqctx",
        "request context cancelled",
        "cause=deadline exceeded (set by the client's query parameter)",
        "kind=deadline_exceeded",
    ]);

    // A hang-up: curl, then Ctrl-C once the handler has started.
    let mut s = send(addr, b"GET /report HTTP/1.1\r\nHost: x\r\n\r\n").await;
    program.line_with(&["INFO", "building the report"]);
    s.shutdown().await.unwrap();
    drop(s);
    program.line_with(&[
        "DEBUG",
        "request context cancelled cause=client disconnected kind=client_disconnected",
    ]);
    // A client's own timeout is not an error of the server's.
    assert!(
        !program.seen.iter().any(|l| l.contains("ERROR")),
        "{:#?}",
        program.seen
    );
}
