//! Real sockets on 127.0.0.1. Every wait is for an event; a timeout only bounds a failure.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::sync::oneshot::{self, error::TryRecvError};
use tokio::time::timeout;

use super::{OnClose, Watch, WatchedIo, Watcher};

/// How long a test waits for an event before it fails.
const BOUND: Duration = Duration::from_secs(5);

async fn listen() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A connected pair: (client, server side).
async fn connect(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

/// A callback and the receiver it signals; the receiver sees `Closed` if the callback is
/// dropped without running.
fn signal() -> (OnClose, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    let on_close = Box::new(move || {
        let _ = tx.send(());
    });
    (on_close, rx)
}

async fn fired(rx: oneshot::Receiver<()>) {
    timeout(BOUND, rx)
        .await
        .expect("the callback did not run within the bound")
        .expect("the callback was dropped without running");
}

#[tokio::test]
async fn fin_before_any_read_fires() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (client, server) = connect(&listener).await;
    let (on_close, rx) = signal();
    let _watch = watcher.watch(server.as_fd(), false, on_close).unwrap();

    drop(client);
    fired(rx).await;
}

/// The case hyper misses: the close sits behind request bytes no one reads.
#[tokio::test]
async fn fin_behind_unread_data_fires() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (mut client, mut server) = connect(&listener).await;
    let (on_close, rx) = signal();
    let watch = watcher.watch(server.as_fd(), false, on_close).unwrap();

    let body = vec![b'x'; 64 * 1024];
    timeout(BOUND, client.write_all(&body))
        .await
        .unwrap()
        .unwrap();
    drop(client);
    fired(rx).await;

    // The bytes were still unread when the callback ran.
    drop(watch);
    let mut received = Vec::new();
    server.read_to_end(&mut received).await.unwrap();
    assert_eq!(received.len(), body.len());
}

#[tokio::test]
async fn rst_fires() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (client, server) = connect(&listener).await;
    let (on_close, rx) = signal();
    let _watch = watcher.watch(server.as_fd(), false, on_close).unwrap();

    // `std`'s `set_linger` is unstable; tokio's `set_zero_linger` is the same `SO_LINGER`.
    client.set_zero_linger().unwrap();
    drop(client);
    fired(rx).await;
}

/// Data arriving wakes no one. Ordered by events: the data is in the server's socket before a
/// second connection closes, and the watcher reports events in the order they happen.
#[tokio::test]
async fn data_does_not_fire() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (mut quiet_client, quiet_server) = connect(&listener).await;
    let (on_close, mut quiet_rx) = signal();
    let _quiet_watch = watcher
        .watch(quiet_server.as_fd(), false, on_close)
        .unwrap();

    for line in ["GET / HTTP/1.1\r\n", "host: a\r\n", "\r\n"] {
        quiet_client.write_all(line.as_bytes()).await.unwrap();
    }
    timeout(BOUND, quiet_server.readable())
        .await
        .unwrap()
        .unwrap();

    let (control_client, control_server) = connect(&listener).await;
    let (on_close, control_rx) = signal();
    let _control_watch = watcher
        .watch(control_server.as_fd(), false, on_close)
        .unwrap();
    drop(control_client);
    fired(control_rx).await;
    assert_eq!(quiet_rx.try_recv(), Err(TryRecvError::Empty));

    // Still watched.
    drop(quiet_client);
    fired(quiet_rx).await;
}

/// A dropped watch never runs its callback, and a later connection on the same fd number
/// gets only its own.
#[tokio::test]
async fn dropped_watch_never_fires_and_fd_reuse_is_harmless() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let addr = listener.local_addr().unwrap();
    // Tests run in parallel threads of one process and take fd numbers too: retry until the
    // number is reused.
    let mut reused = false;
    for _ in 0..20 {
        let (old_client, old_server) = connect(&listener).await;
        let (on_close, mut old_rx) = signal();
        let mut old_watch = watcher.watch(old_server.as_fd(), false, on_close).unwrap();
        let old_fd = old_server.as_raw_fd();
        // Connected now, so that its client socket does not take the number freed below.
        let new_client = TcpStream::connect(addr).await.unwrap();

        old_watch.stop(old_server.as_fd());
        assert_eq!(old_rx.try_recv(), Err(TryRecvError::Closed));
        drop(old_server);

        let (new_server, _) = listener.accept().await.unwrap();
        reused |= new_server.as_raw_fd() == old_fd;
        drop(old_client); // only now: its lower fd number would be taken first
        let (on_close, new_rx) = signal();
        let _new_watch = watcher.watch(new_server.as_fd(), false, on_close).unwrap();
        drop(new_client);
        fired(new_rx).await;
        if reused {
            break;
        }
    }
    assert!(reused, "no fd number was reused in 20 tries");
}

/// Invariant 4: a watch dropped too late, after its socket's fd number went to another
/// connection, does not remove that connection's watch.
#[tokio::test]
async fn late_dropped_watch_leaves_other_watches_alone() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (old_client, old_server) = connect(&listener).await;
    let (on_close, mut old_rx) = signal();
    let old_watch = watcher.watch(old_server.as_fd(), false, on_close).unwrap();
    drop(old_server); // wrong order, on purpose

    let (new_client, new_server) = connect(&listener).await;
    let (on_close, new_rx) = signal();
    let _new_watch = watcher.watch(new_server.as_fd(), false, on_close).unwrap();
    drop(old_watch);
    assert_eq!(old_rx.try_recv(), Err(TryRecvError::Closed));

    drop(new_client);
    fired(new_rx).await;
    drop(old_client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_each_fire_once() {
    const N: usize = 200;
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
    let total = Arc::new(AtomicUsize::new(0));
    let all_fired = Arc::new(Notify::new());

    let mut clients = Vec::with_capacity(N);
    let mut servers = Vec::with_capacity(N);
    for i in 0..N {
        let (client, server) = connect(&listener).await;
        let (counts, total, all_fired) = (counts.clone(), total.clone(), all_fired.clone());
        let on_close = Box::new(move || {
            counts[i].fetch_add(1, Ordering::Relaxed);
            if total.fetch_add(1, Ordering::AcqRel) + 1 == N {
                all_fired.notify_one();
            }
        });
        let watch = watcher.watch(server.as_fd(), false, on_close).unwrap();
        clients.push(client);
        servers.push((watch, server));
    }
    drop(clients);
    timeout(BOUND, all_fired.notified()).await.unwrap();

    // Closing our side reports the sockets again; those events must find nothing to run. A
    // control connection closed afterwards is reported after them.
    for (_, server) in &mut servers {
        server.shutdown().await.unwrap();
    }
    let (control_client, control_server) = connect(&listener).await;
    let (on_close, control_rx) = signal();
    let _control_watch = watcher
        .watch(control_server.as_fd(), false, on_close)
        .unwrap();
    drop(control_client);
    fired(control_rx).await;

    assert_eq!(total.load(Ordering::Acquire), N);
    for (i, count) in counts.iter().enumerate() {
        assert_eq!(count.load(Ordering::Relaxed), 1, "connection {i}");
    }
}

/// The failed write alone fires it: the watch is on a decoy connection that stays open, so
/// the epoll set has nothing to report.
#[tokio::test]
async fn failed_write_fires() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (_decoy_client, decoy_server) = connect(&listener).await;
    let (client, server) = connect(&listener).await;
    let (on_close, mut rx) = signal();
    let watch = watcher
        .watch(decoy_server.as_fd(), false, on_close)
        .unwrap();
    let mut io = WatchedIo::new(server, Some(watch));

    client.set_zero_linger().unwrap();
    drop(client);
    // An RST makes the socket readable (with an error).
    timeout(BOUND, io.get_ref().readable())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));

    let write = async {
        loop {
            if let Err(err) = io.write_all(b"HTTP/1.1 200 OK\r\n").await {
                break err;
            }
        }
    };
    let err = timeout(BOUND, write).await.unwrap();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{err}"
    );
    assert_eq!(rx.try_recv(), Ok(()));
}

/// `WatchedIo` deletes its socket from the epoll set before the socket closes, through the
/// socket itself: even when another descriptor of the same socket stays open (a `dup`, a
/// fork), which the kernel's removal at the last close would not cover.
#[tokio::test]
async fn watched_io_deletes_its_socket_before_closing_it() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (client, server) = connect(&listener).await;
    let (on_close, mut rx) = signal();
    let watch = watcher.watch(server.as_fd(), false, on_close).unwrap();
    assert_eq!(watcher.entries_for_test(), 1);
    let dup = server.as_fd().try_clone_to_owned().unwrap();

    drop(WatchedIo::new(server, Some(watch)));
    assert_eq!(watcher.entries_for_test(), 0);
    assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
    drop(client);
    drop(dup);
}

/// One fd per connection: watching opens no descriptor.
#[tokio::test]
async fn watching_opens_no_fd() {
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (_client, server) = connect(&listener).await;
    // Other tests open fds concurrently: compare the watch's own count with a retry.
    let mut equal = false;
    for _ in 0..20 {
        let before = open_fds();
        let (on_close, _rx) = signal();
        let mut watch = watcher.watch(server.as_fd(), false, on_close).unwrap();
        let during = open_fds();
        watch.stop(server.as_fd());
        if before == during {
            equal = true;
            break;
        }
    }
    assert!(equal, "watching a socket opened a descriptor in 20 tries");
}

/// Under half-close a FIN is not reported; a reset is.
#[tokio::test]
async fn half_close_ignores_fin_and_sees_rst() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (mut half_client, half_server) = connect(&listener).await;
    let (on_close, mut half_rx) = signal();
    let _half_watch = watcher.watch(half_server.as_fd(), true, on_close).unwrap();
    half_client.shutdown().await.unwrap(); // FIN
    // The FIN is in: the server's read returns end-of-file.
    let mut server = half_server;
    assert_eq!(server.read(&mut [0; 8]).await.unwrap(), 0);

    // A control connection closed afterwards is reported after the FIN would have been.
    let (control_client, control_server) = connect(&listener).await;
    let (on_close, control_rx) = signal();
    let _control_watch = watcher
        .watch(control_server.as_fd(), false, on_close)
        .unwrap();
    drop(control_client);
    fired(control_rx).await;
    assert_eq!(half_rx.try_recv(), Err(TryRecvError::Empty));

    let (reset_client, reset_server) = connect(&listener).await;
    let (on_close, reset_rx) = signal();
    let _reset_watch = watcher.watch(reset_server.as_fd(), true, on_close).unwrap();
    reset_client.set_zero_linger().unwrap();
    drop(reset_client);
    fired(reset_rx).await;
    drop(half_client);
}

/// The task outlives the `Watcher` while a `Watch` lives, and ends with the last one.
#[tokio::test]
async fn task_ends_with_the_last_handle() {
    let (watcher, task) = Watcher::start_for_test().unwrap();
    let listener = listen().await;
    let (client, server) = connect(&listener).await;
    let (on_close, rx) = signal();
    let watch = watcher.watch(server.as_fd(), false, on_close).unwrap();
    drop(watcher);

    drop(client);
    fired(rx).await;
    assert!(!task.is_finished());
    drop(watch);
    timeout(BOUND, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn unwatchable_fd_is_an_error() {
    let watcher = Watcher::new().unwrap();
    let file = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
    let (on_close, mut rx) = signal();
    let err = watcher.watch(file.as_fd(), false, on_close).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(rustix::io::Errno::PERM.raw_os_error())
    );
    assert_eq!(rx.try_recv(), Err(TryRecvError::Closed));
}

#[tokio::test]
async fn panicking_callback_does_not_stop_the_watcher() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (bad_client, bad_server) = connect(&listener).await;
    let _bad_watch = watcher
        .watch(
            bad_server.as_fd(),
            false,
            Box::new(|| panic!("on_close panicked (expected by this test)")),
        )
        .unwrap();
    let (good_client, good_server) = connect(&listener).await;
    let (on_close, rx) = signal();
    let _good_watch = watcher.watch(good_server.as_fd(), false, on_close).unwrap();

    drop(bad_client);
    drop(good_client);
    fired(rx).await;
}

#[tokio::test]
async fn fire_runs_the_callback_once() {
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (client, server) = connect(&listener).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let on_close = Box::new(move || {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let watch = watcher.watch(server.as_fd(), false, on_close).unwrap();
    watch.fire();
    watch.fire();
    assert_eq!(runs.load(Ordering::Relaxed), 1);

    // The close is still reported, and finds nothing to run: a control connection shows the
    // watcher got that far.
    drop(client);
    let (control_client, control_server) = connect(&listener).await;
    let (on_close, control_rx) = signal();
    let _control_watch = watcher
        .watch(control_server.as_fd(), false, on_close)
        .unwrap();
    drop(control_client);
    fired(control_rx).await;
    assert_eq!(runs.load(Ordering::Relaxed), 1);
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Watcher>();
    send_sync::<Watch>();
    send_sync::<WatchedIo<TcpStream>>();
}

/// Many watches on one watcher, their clients closed one at a time in an order unlike the
/// order they were watched in: each close runs the callback of its own connection, and only
/// that one, before the next close. Run under both runtime flavours, since the watcher's
/// task is woken differently on each.
async fn each_close_runs_its_own_callback() {
    const N: usize = 20;
    let watcher = Watcher::new().unwrap();
    let listener = listen().await;
    let (tx, mut ran) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::with_capacity(N);
    let mut watched = Vec::with_capacity(N); // keeps each watch and server side alive
    for i in 0..N {
        let (client, server) = connect(&listener).await;
        let tx = tx.clone();
        let on_close = Box::new(move || {
            let _ = tx.send(i);
        });
        watched.push((
            watcher.watch(server.as_fd(), false, on_close).unwrap(),
            server,
        ));
        clients.push(Some(client));
    }
    for k in 0..N {
        let i = (k * 7 + 3) % N; // 7 is prime to N: every connection once, out of order
        drop(clients[i].take());
        let seen = timeout(BOUND, ran.recv()).await.unwrap().unwrap();
        assert_eq!(
            seen, i,
            "close {k} of client {i} ran connection {seen}'s callback"
        );
    }
    assert!(clients.iter().all(Option::is_none));
    assert!(ran.try_recv().is_err(), "a callback ran twice");
}

#[tokio::test]
async fn each_close_runs_its_own_callback_current_thread() {
    each_close_runs_its_own_callback().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_close_runs_its_own_callback_multi_thread() {
    each_close_runs_its_own_callback().await;
}
