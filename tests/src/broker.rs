//! Launcher for the test broker, nisshi 0.7.0 (see DESIGN.md §4).
//!
//! [`nisshi_binary`] finds the broker binary (or installs it once per machine, under a file
//! lock), and [`Broker`] runs it on a free loopback port with memory storage. Clients should
//! normally not talk to the broker directly but through the read-committed
//! [`Proxy`](crate::proxy::Proxy); [`TestCluster`](crate::cluster::TestCluster) wires both.

use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::HarnessError;
use crate::proxy::client::KafkaConnection;

/// The only nisshi version the harness is known to work with (DESIGN.md §4).
pub const NISSHI_VERSION: &str = "0.7.0";

/// How long [`Broker::start`] waits for the broker to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Broker::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The cache directory of the harness: `$EXACTLY_CACHE_DIR`, else `$HOME/.cache/exactly`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EXACTLY_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("exactly")
}

/// Where [`nisshi_binary`] installs nisshi: `<cache_dir>/nisshi-0.7.0`.
pub fn install_root() -> PathBuf {
    cache_dir().join(format!("nisshi-{NISSHI_VERSION}"))
}

/// Finds a nisshi 0.7.0 binary, installing it if there is none.
///
/// Looks, in order, at `$EXACTLY_NISSHI` (a path; an error if it is not nisshi 0.7.0), every
/// `nisshi` on `PATH`, and `<cache_dir>/nisshi-0.7.0/bin/nisshi`. If none is 0.7.0 it runs
/// `cargo +nightly install nisshi --version 0.7.0 --locked --no-default-features
/// --features dynostore --root <cache_dir>/nisshi-0.7.0` (10–15 minutes cold) while holding an
/// exclusive lock on `<cache_dir>/nisshi-0.7.0.lock`, so concurrent tests and processes install
/// once: the others wait for the lock, then find the binary.
pub async fn nisshi_binary() -> Result<PathBuf, HarnessError> {
    tokio::task::spawn_blocking(nisshi_binary_blocking)
        .await
        .map_err(|e| HarnessError::NisshiUnavailable(format!("install task failed: {e}")))?
}

/// The blocking body of [`nisshi_binary`]: probes candidates, then installs under a lock.
fn nisshi_binary_blocking() -> Result<PathBuf, HarnessError> {
    // Every test of a process asks; probe the candidates once.
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(path) = FOUND.get() {
        return Ok(path.clone());
    }
    let path = find_or_install()?;
    Ok(FOUND.get_or_init(|| path).clone())
}

fn find_or_install() -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os("EXACTLY_NISSHI").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return match probe_version(&path) {
            Ok(()) => Ok(path),
            Err(reason) => Err(HarnessError::NisshiUnavailable(format!(
                "EXACTLY_NISSHI={} is not usable: {reason}",
                path.display()
            ))),
        };
    }
    if let Some(path) = find_on_path() {
        return Ok(path);
    }
    let cached = install_root().join("bin").join("nisshi");
    if probe_version(&cached).is_ok() {
        return Ok(cached);
    }

    let cache = cache_dir();
    std::fs::create_dir_all(&cache)
        .map_err(|e| HarnessError::io(format!("creating cache dir {}", cache.display()), e))?;
    let lock_path = cache.join(format!("nisshi-{NISSHI_VERSION}.lock"));
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| HarnessError::io(format!("opening lock file {}", lock_path.display()), e))?;
    tracing::info!(lock = %lock_path.display(), "waiting for the nisshi install lock");
    fs4::FileExt::lock(&lock_file)
        .map_err(|e| HarnessError::io(format!("locking {}", lock_path.display()), e))?;
    // Another process may have installed it while this one waited for the lock.
    let result = if probe_version(&cached).is_ok() {
        Ok(cached)
    } else {
        install(&cached)
    };
    // Closing the file also releases the lock; unlocking explicitly makes the order obvious.
    let _ = fs4::FileExt::unlock(&lock_file);
    result
}

/// Every `nisshi` on `PATH` that reports version 0.7.0; the first one wins.
fn find_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nisshi"))
        .find(|candidate| candidate.is_file() && probe_version(candidate).is_ok())
}

/// Runs `<path> --version` and checks it prints `nisshi 0.7.0`.
fn probe_version(path: &Path) -> Result<(), String> {
    if !path.is_file() {
        return Err("no such file".into());
    }
    let output = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running --version failed: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let reported = stdout.trim();
    if output.status.success() && reported.split_whitespace().any(|w| w == NISSHI_VERSION) {
        Ok(())
    } else {
        Err(format!(
            "`--version` printed {reported:?} (status {}), expected nisshi {NISSHI_VERSION}",
            output.status
        ))
    }
}

/// Installs nisshi with `cargo +nightly install` into `install_root()`; the caller holds the lock.
fn install(expected_binary: &Path) -> Result<PathBuf, HarnessError> {
    let root = install_root();
    // `cargo +nightly` only works through rustup's cargo proxy (not `$CARGO`, which points at
    // the toolchain running the tests); check nightly exists first so
    // the error says what to install instead of a cargo usage message.
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .stdin(Stdio::null())
        .output();
    match nightly {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(HarnessError::NisshiUnavailable(format!(
                "nisshi {NISSHI_VERSION} is not installed and `cargo +nightly` does not work \
                 ({}); its dependencies need rustc >= 1.96: run `rustup toolchain install \
                 nightly --profile minimal`, or install nisshi yourself and set EXACTLY_NISSHI",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
        Err(e) => {
            return Err(HarnessError::NisshiUnavailable(format!(
                "nisshi {NISSHI_VERSION} is not installed and cargo could not be run ({e}); \
                 install rustup with a nightly toolchain, or install nisshi and set EXACTLY_NISSHI"
            )))
        }
    }
    let log = cache_dir().join(format!("nisshi-{NISSHI_VERSION}-install.log"));
    let log_file = std::fs::File::create(&log)
        .map_err(|e| HarnessError::io(format!("creating {}", log.display()), e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| HarnessError::io(format!("cloning handle of {}", log.display()), e))?;
    eprintln!(
        "installing nisshi {NISSHI_VERSION} (10-15 minutes cold) into {} ; progress in {}",
        root.display(),
        log.display()
    );
    let started = Instant::now();
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "nisshi",
            "--version",
            NISSHI_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "dynostore",
            "--root",
        ])
        .arg(&root)
        // A CARGO_TARGET_DIR shared with the project would be locked by the running test build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .status()
        .map_err(|e| HarnessError::io("running cargo +nightly install nisshi", e))?;
    if !status.success() {
        return Err(HarnessError::NisshiInstall {
            root,
            status: status.to_string(),
            log,
        });
    }
    probe_version(expected_binary).map_err(|reason| {
        HarnessError::NisshiUnavailable(format!(
            "installed into {} but {}: {reason}",
            root.display(),
            expected_binary.display()
        ))
    })?;
    eprintln!(
        "installed nisshi {NISSHI_VERSION} in {:.0?}",
        started.elapsed()
    );
    Ok(expected_binary.to_path_buf())
}

/// Options for [`Broker::start_with`].
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Kafka's `group.initial.rebalance.delay.ms`: how long the first rebalance of an empty
    /// consumer group waits for more members. nisshi's default is 3 s; tests usually want less.
    pub group_initial_rebalance_delay: Duration,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            group_initial_rebalance_delay: Duration::from_millis(200),
        }
    }
}

/// A running nisshi broker child process with memory storage on a loopback port.
///
/// Dropping it SIGKILLs and reaps the process it started (only that pid). The log of the
/// broker is written to [`Broker::log_path`], in a directory that is kept after the test so a
/// failure can be investigated.
#[derive(Debug)]
pub struct Broker {
    binary: PathBuf,
    address: SocketAddr,
    options: BrokerOptions,
    log_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker with [`BrokerOptions::default`] and waits until it answers a Kafka
    /// ApiVersions request.
    pub async fn start() -> Result<Broker, HarnessError> {
        Broker::start_with(BrokerOptions::default()).await
    }

    /// Starts a broker with the given options; see [`Broker::start`].
    pub async fn start_with(options: BrokerOptions) -> Result<Broker, HarnessError> {
        let binary = nisshi_binary().await?;
        let address = free_loopback_address()?;
        let log_dir = tempfile::Builder::new()
            .prefix("exactly-nisshi-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the broker's log directory", e))?
            .keep();
        let log_path = log_dir.join("nisshi.log");
        let mut broker = Broker {
            binary,
            address,
            options,
            log_dir,
            log_path,
            child: None,
        };
        broker.spawn_and_wait().await?;
        Ok(broker)
    }

    /// The address the broker listens on and advertises (loopback).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The broker's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The pid of the running broker process, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the broker: SIGTERM, then SIGKILL after a grace period; the process is reaped.
    /// Stopping a stopped broker does nothing.
    pub async fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        if child.try_wait().ok().flatten().is_none() {
            // Only the pid this Broker spawned, and only while it is not reaped yet.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(None) => {
                        tracing::warn!(pid, "nisshi ignored SIGTERM, sending SIGKILL");
                        let _ = child.kill();
                        break;
                    }
                    Err(e) => {
                        return Err(HarnessError::BrokerStop {
                            pid,
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
        // After SIGKILL the process exits promptly; reap it off the reactor.
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .map_err(|e| HarnessError::BrokerStop {
                pid,
                reason: e.to_string(),
            })?
            .map_err(|e| HarnessError::BrokerStop {
                pid,
                reason: e.to_string(),
            })?;
        Ok(())
    }

    /// Stops and starts the broker on the same port.
    ///
    /// With memory storage **all data is lost**: topics, records, transactions, group offsets.
    /// Recreate topics afterwards and call [`Proxy::reset_index`](crate::proxy::Proxy::reset_index)
    /// on a proxy in front of it.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop().await?;
        self.spawn_and_wait().await
    }

    /// Spawns the broker process and waits until it answers ApiVersions.
    async fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io(format!("cloning {}", self.log_path.display()), e))?;
        let url = format!("tcp://{}", self.address);
        let rust_log = std::env::var("EXACTLY_NISSHI_LOG").unwrap_or_else(|_| "warn".into());
        let mut command = Command::new(&self.binary);
        command
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://nisshi/"])
            .arg("--group-initial-rebalance-delay")
            .arg(format!(
                "{}ms",
                self.options.group_initial_rebalance_delay.as_millis()
            ))
            // nisshi reads a `.env` from its working directory and several environment
            // variables; keep the test broker independent of whatever the caller has.
            .current_dir(&self.log_dir)
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("GROUP_POLL_INTERVAL")
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // With PR_SET_PDEATHSIG, so a test process killed by SIGKILL leaks no broker. The spawn
        // waits for the spawner thread: off the reactor.
        let spawn_context = || format!("spawning {}", self.binary.display());
        let child = tokio::task::spawn_blocking(move || {
            crate::process::spawn_with_parent_death_signal(command)
        })
        .await
        .map_err(|e| HarnessError::io(spawn_context(), std::io::Error::other(e)))?
        .map_err(|e| HarnessError::io(spawn_context(), e))?;
        tracing::info!(pid = child.id(), address = %self.address, log = %self.log_path.display(), "started nisshi");
        self.child = Some(child);

        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.not_ready(format!("the broker exited with {status}")));
                }
            }
            if answers_api_versions(self.address).await {
                tracing::info!(address = %self.address, elapsed = ?started.elapsed(), "nisshi ready");
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let error =
                    self.not_ready(format!("no ApiVersions answer within {READY_TIMEOUT:?}"));
                let _ = self.stop().await;
                return Err(error);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn not_ready(&self, reason: String) -> HarnessError {
        HarnessError::BrokerNotReady {
            address: self.address,
            reason,
            log: self.log_path.clone(),
            log_tail: log_tail(&self.log_path, 40),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Only the child this Broker spawned; `Child::kill` is a no-op error once reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// True when a Kafka ApiVersions request to `address` gets an answer without error.
async fn answers_api_versions(address: SocketAddr) -> bool {
    let attempt = async {
        let mut connection = KafkaConnection::connect(address).await.ok()?;
        connection.api_versions().await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(_))
    )
}

/// A loopback address with a port that was free a moment ago.
pub fn free_loopback_address() -> Result<SocketAddr, HarnessError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HarnessError::io("binding 127.0.0.1:0 to find a free port", e))?;
    listener
        .local_addr()
        .map_err(|e| HarnessError::io("reading the free port's address", e))
}

/// The last `lines` lines of a log file (at most its last 64 KiB), for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    let _ = file.take(64 * 1024).read_to_end(&mut bytes);
    text.push_str(&String::from_utf8_lossy(&bytes));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
