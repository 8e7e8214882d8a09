//! A PostgreSQL server for the tests: `DATABASE_URL` when set, otherwise a throwaway
//! cluster (`initdb` + `pg_ctl`, run as the `postgres` user when we are root) in a
//! temporary directory on a free port, stopped by a watchdog when the test process exits.
//!
//! The throwaway cluster also serves TLS (`ssl = on`) with a certificate for `127.0.0.1`
//! and `localhost` signed by a CA generated here ([`Db::ca`]); plain connections work as
//! before.
//!
//! No server at all: the tests fail under `REQCTX_PG_REQUIRED=1` (CI), and otherwise say
//! loudly that they were skipped.
#![allow(missing_docs)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A reachable server.
#[derive(Debug)]
pub struct Db {
    /// A connection string for it.
    pub url: String,
    /// The CA (DER) that signed the server's certificate: `None` when the server is
    /// `DATABASE_URL` (TLS unknown).
    pub ca: Option<Vec<u8>>,
    /// The cluster's directory (sockets, log), for helpers that start next to it.
    pub dir: Option<PathBuf>,
}

impl Db {
    pub fn config(&self) -> tokio_postgres::Config {
        self.url.parse().expect("the test URL parses")
    }

    /// A plain connection (its task spawned) for watching the server.
    pub async fn monitor(&self) -> tokio_postgres::Client {
        let (client, conn) = self
            .config()
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect the monitor");
        tokio::spawn(conn);
        client
    }
}

static DB: OnceLock<Option<Db>> = OnceLock::new();

/// The server, or `None` (after saying so) when there is none and none is required.
pub fn db() -> Option<&'static Db> {
    let db = DB.get_or_init(|| match find_or_start() {
        Ok(db) => Some(db),
        Err(why) => {
            if std::env::var("REQCTX_PG_REQUIRED").as_deref() == Ok("1") {
                panic!("REQCTX_PG_REQUIRED=1 but no PostgreSQL server: {why}");
            }
            None
        }
    });
    if db.is_none() {
        eprintln!(
            "\n!!! SKIPPED: no PostgreSQL server (set DATABASE_URL, or install PostgreSQL so \
             initdb is found; REQCTX_PG_REQUIRED=1 makes this a failure) !!!\n"
        );
    }
    db.as_ref()
}

fn find_or_start() -> Result<Db, String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok(Db {
            url,
            ca: None,
            dir: None,
        });
    }
    let bin = find_bindir().ok_or("no initdb under /usr/lib/postgresql/*/bin or on PATH")?;
    start_cluster(&bin)
}

fn find_bindir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort(); // the newest version last
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// `program` with `args`, as the `postgres` user when we are root.
fn as_server_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn start_cluster(bin: &Path) -> Result<Db, String> {
    let root = is_root();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("reqctx-pg-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    if root {
        let mut chown = Command::new("chown");
        chown.arg("postgres:").arg(&dir);
        run(chown, "chown the cluster directory to postgres")?;
    }
    let data = dir.join("data");
    let mut initdb = as_server_user(root, &bin.join("initdb"));
    initdb.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
        "--no-instructions",
    ]);
    run(initdb, "initdb")?;

    // TLS: a CA and a server certificate signed by it, for the TLS tests.
    let (ca, cert_pem, key_pem) = certificates()?;
    let (cert, key) = (data.join("server.crt"), data.join("server.key"));
    std::fs::write(&cert, cert_pem).map_err(|e| format!("write the certificate: {e}"))?;
    std::fs::write(&key, key_pem).map_err(|e| format!("write the key: {e}"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod the key: {e}"))?;
    }
    if root {
        let mut chown = Command::new("chown");
        chown.arg("postgres:").arg(&cert).arg(&key);
        run(chown, "chown the certificate to postgres")?;
    }

    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("find a free port: {e}"))?
        .port();
    let mut start = as_server_user(root, &bin.join("pg_ctl"));
    start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("log"))
        .args([
            "-w",
            "-t",
            "60",
            "-o",
            &format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 \
                 -c ssl=on",
                dir.display()
            ),
            "start",
        ]);
    run(start, "pg_ctl start")?;

    // Stop the cluster and remove it once this test process has exited.
    let stop = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {runuser}{pg_ctl} -D {data} -m immediate stop; rm -rf {dir}",
        pid = std::process::id(),
        runuser = if root { "runuser -u postgres -- " } else { "" },
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &stop])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn the watchdog: {e}"))?;

    Ok(Db {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        ca: Some(ca),
        dir: Some(dir),
    })
}

/// A CA (DER) and a server certificate and key (PEM) for `127.0.0.1` and `localhost`.
fn certificates() -> Result<(Vec<u8>, String, String), String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let err = |e: rcgen::Error| format!("rcgen: {e}");
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .map_err(err)?;
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(err)?;
    Ok((ca.der().to_vec(), cert.pem(), key.serialize_pem()))
}

/// A rustls connector trusting the test CA, for `tokio-postgres`.
pub fn rustls(db: &Db) -> Option<tokio_postgres_rustls::MakeRustlsConnect> {
    let ca = db.ca.as_ref()?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca.clone()))
        .expect("the test CA is a certificate");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS 1.2 and 1.3 with ring")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Some(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Polls `pg_stat_activity` until `pid` is idle; the time it took, or `None` after `limit`.
pub async fn wait_idle(
    monitor: &tokio_postgres::Client,
    pid: i32,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if state_of(monitor, pid).await.as_deref() != Some("active") {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// Polls until `pid` runs a statement (so a test cancels a statement that really runs).
pub async fn wait_active(monitor: &tokio_postgres::Client, pid: i32) {
    let started = Instant::now();
    while state_of(monitor, pid).await.as_deref() != Some("active") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "backend {pid} never became active"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The backend's `state` in `pg_stat_activity` (`None`: no such backend any more).
pub async fn state_of(monitor: &tokio_postgres::Client, pid: i32) -> Option<String> {
    monitor
        .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .expect("read pg_stat_activity")
        .and_then(|row| row.get::<_, Option<String>>(0))
}

/// A PgBouncer in front of the throwaway cluster, started by the tests (Debian's
/// `pgbouncer`, run as the `postgres` user when we are root, stopped with the test
/// process).
#[derive(Debug)]
pub struct Bouncer {
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Bouncer {
    /// A connection string through it to `pool` (`"a"` or `"b"`: two pools over the same
    /// database, one server connection each, so that tests running at once do not share
    /// a backend).
    pub fn url(&self, pool: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{pool}", self.port)
    }

    pub fn config(&self, pool: &str) -> tokio_postgres::Config {
        self.url(pool).parse().expect("the bouncer URL parses")
    }
}

static SESSION: OnceLock<Option<Bouncer>> = OnceLock::new();
static TRANSACTION: OnceLock<Option<Bouncer>> = OnceLock::new();

/// PgBouncer in `pool_mode` (`"session"` or `"transaction"`) with one server connection
/// per pool (so clients share a backend), or `None` (after saying so) without a
/// `pgbouncer` binary or our own cluster; under `REQCTX_PG_REQUIRED=1` a missing one fails.
pub fn bouncer(db: &Db, pool_mode: &str) -> Option<&'static Bouncer> {
    let slot = match pool_mode {
        "session" => &SESSION,
        "transaction" => &TRANSACTION,
        other => panic!("pool mode {other}"),
    };
    let b = slot.get_or_init(|| match start_bouncer(db, pool_mode) {
        Ok(b) => Some(b),
        Err(why) => {
            if std::env::var("REQCTX_PG_REQUIRED").as_deref() == Ok("1") {
                panic!("REQCTX_PG_REQUIRED=1 but no PgBouncer: {why}");
            }
            eprintln!("\n!!! SKIPPED: no PgBouncer ({why}) !!!\n");
            None
        }
    });
    b.as_ref()
}

fn start_bouncer(db: &Db, pool_mode: &str) -> Result<Bouncer, String> {
    let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("no pgbouncer binary (apt-get install pgbouncer)")?;
    let cluster = db.dir.as_ref().ok_or("DATABASE_URL server: not ours")?;
    let upstream = db.config().get_ports().first().copied().unwrap_or(5432);
    let dir = cluster.join(format!("pgbouncer-{pool_mode}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("find a free port: {e}"))?
        .port();
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n")
        .map_err(|e| format!("write users.txt: {e}"))?;
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             a = host=127.0.0.1 port={upstream} dbname=postgres user=postgres\n\
             b = host=127.0.0.1 port={upstream} dbname=postgres user=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             pool_mode = {pool_mode}\n\
             default_pool_size = 1\n\
             max_client_conn = 200\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display()
        ),
    )
    .map_err(|e| format!("write pgbouncer.ini: {e}"))?;
    let root = is_root();
    if root {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg("postgres:").arg(&dir);
        run(chown, "chown the bouncer directory to postgres")?;
    }
    let mut start = as_server_user(root, &bin);
    start.arg("-d").arg(&ini);
    run(start, "pgbouncer -d")?;
    // Stop it once this test process has exited.
    let stop = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; kill $(cat {dir}/pgbouncer.pid)",
        pid = std::process::id(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &stop])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn the bouncer's watchdog: {e}"))?;
    // Daemonised once listening; still, wait until it accepts.
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err("pgbouncer did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Bouncer { port })
}
