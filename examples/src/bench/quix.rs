//! Quix Streams 3.28.1, the Python peer the benchmark measures against.
//!
//! [`prepare`] makes sure a virtualenv with `quixstreams==3.28.1` exists in the harness cache
//! (`${EXACTLY_CACHE_DIR:-~/.cache/exactly}/quix-3.28.1-venv`), installing it with pip under a
//! file lock the first time (about half a minute with a warm network). [`QuixEnv::spawn_count`]
//! then starts `examples/bench/quix_count.py`: the same stateful per-key count and sum the
//! benchmark runs on `exactly`, with `processing_guarantee="exactly-once"`.
//!
//! Everything here is blocking (process start-up, pip, `waitpid`): call it from a plain thread
//! or `tokio::task::spawn_blocking`, not from the reactor.
//!
//! Whatever fails, the error says exactly why (no `python3`, venv or pip failure with the log
//! tail, import failure, ...): the benchmark reports it instead of a number.
//!
//! ```no_run
//! use std::time::Duration;
//! use exactly_examples::bench::quix::{prepare, QuixCountArgs};
//!
//! # fn demo() -> Result<(), exactly_examples::bench::quix::QuixUnavailable> {
//! let env = prepare(|step| eprintln!("quix: {step}"))?;
//! let mut quix = env.spawn_count(&QuixCountArgs {
//!     broker: "127.0.0.1:9092".into(),
//!     input_topic: "bench-input".into(),
//!     output_topic: "bench-output".into(),
//!     group: "bench-quix".into(),
//!     commit_interval: None,
//!     log_path: "/tmp/quix.log".into(),
//! })?;
//! // ... poll the group's committed offsets until the input is consumed ...
//! if let Some(why) = quix.try_exit() {
//!     eprintln!("Quix died: {why}");
//! }
//! let stopped = quix.stop()?;
//! eprintln!("Quix stopped: {}", stopped.status);
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The Quix Streams version the benchmark measures.
pub const QUIX_VERSION: &str = "3.28.1";

/// How long [`QuixProcess::stop`] lets Quix finish after `SIGTERM` (it commits its open
/// checkpoint, closes its transactional producer and leaves the group) before `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How often [`QuixProcess::stop`] checks whether the process has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How many log lines error messages and exit descriptions quote.
const TAIL_LINES: usize = 20;

/// The interpreter used to create the virtualenv.
const SYSTEM_PYTHON: &str = "python3";

/// Prints the installed version; the last stdout line is parsed by [`parse_version_output`].
const VERSION_PROBE: &str = "import quixstreams; print(quixstreams.__version__)";

/// Why Quix cannot be prepared or started. The message says what failed and where to look.
#[derive(Debug, thiserror::Error)]
pub enum QuixUnavailable {
    /// `python3` is not on `PATH` (or cannot be run).
    #[error("cannot run `{SYSTEM_PYTHON}` to create the Quix virtualenv (is Python 3 installed and on PATH?): {source}")]
    NoPython {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file or directory the installation needs could not be created, opened or locked.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `python3 -m venv` failed (on Debian/Ubuntu the `python3-venv` package may be missing).
    #[error("`{SYSTEM_PYTHON} -m venv {}` failed ({status}); log: {}\n--- last lines ---\n{tail}", venv.display(), log.display())]
    Venv {
        /// The virtualenv directory.
        venv: PathBuf,
        /// How the command exited.
        status: ExitStatus,
        /// The install log.
        log: PathBuf,
        /// The last lines of the install log.
        tail: String,
    },
    /// `pip install quixstreams==3.28.1` failed.
    #[error("`pip install quixstreams=={QUIX_VERSION}` into {} failed ({status}); log: {}\n--- last lines ---\n{tail}", venv.display(), log.display())]
    Pip {
        /// The virtualenv directory.
        venv: PathBuf,
        /// How pip exited.
        status: ExitStatus,
        /// The install log.
        log: PathBuf,
        /// The last lines of the install log.
        tail: String,
    },
    /// After installing, the virtualenv's Python still cannot import quixstreams 3.28.1.
    #[error("after installing, {} cannot import quixstreams {QUIX_VERSION}: {reason}; install log: {}", python.display(), log.display())]
    Import {
        /// The virtualenv's interpreter.
        python: PathBuf,
        /// What the import probe reported.
        reason: String,
        /// The install log.
        log: PathBuf,
    },
    /// The Quix app script is not where the source tree should have it.
    #[error("the Quix app script {} is missing (the benchmark must run from the exactly source tree)", path.display())]
    ScriptMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Starting the Quix app failed.
    #[error("cannot start the Quix app with {}: {source}; log: {}", python.display(), log.display())]
    Spawn {
        /// The interpreter.
        python: PathBuf,
        /// The log file.
        log: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Waiting for the Quix process failed.
    #[error("waiting for the Quix app (pid {pid}) failed: {source}; log: {}", log.display())]
    Wait {
        /// Its pid.
        pid: u32,
        /// The log file.
        log: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A virtualenv with quixstreams 3.28.1, ready to run the benchmark's Quix app.
#[derive(Debug, Clone)]
pub struct QuixEnv {
    /// The virtualenv's interpreter (`<venv>/bin/python`).
    python: PathBuf,
    /// The Quix app (`examples/bench/quix_count.py`).
    script: PathBuf,
}

/// Where the virtualenv lives: `<cache dir>/quix-3.28.1-venv`.
pub fn venv_dir() -> PathBuf {
    exactly_tests::kafka::cache_dir().join(format!("quix-{QUIX_VERSION}-venv"))
}

/// The Quix app script in the source tree: `examples/bench/quix_count.py`.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join("quix_count.py")
}

/// Ensures the virtualenv at [`venv_dir`] has quixstreams 3.28.1 and returns it.
///
/// Reuses the virtualenv when its Python already imports quixstreams 3.28.1. Otherwise, holding
/// an exclusive lock on `<cache dir>/quix-3.28.1.lock` (so concurrent benchmarks install
/// once), creates it with `python3 -m venv` if needed and runs `pip install
/// quixstreams==3.28.1`, with all output in `<cache dir>/quix-3.28.1-install.log`. `progress`
/// is told about each slow step. Blocks for as long as that takes.
pub fn prepare(progress: impl Fn(&str)) -> Result<QuixEnv, QuixUnavailable> {
    let script = script_path();
    if !script.is_file() {
        return Err(QuixUnavailable::ScriptMissing { path: script });
    }
    let venv = venv_dir();
    let python = venv.join("bin").join("python");
    if probe_version(&python).is_ok() {
        return Ok(QuixEnv { python, script });
    }

    let cache = exactly_tests::kafka::cache_dir();
    std::fs::create_dir_all(&cache).map_err(|source| QuixUnavailable::Io {
        what: "creating the cache directory",
        path: cache.clone(),
        source,
    })?;
    let lock_path = cache.join(format!("quix-{QUIX_VERSION}.lock"));
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| QuixUnavailable::Io {
            what: "opening the install lock",
            path: lock_path.clone(),
            source,
        })?;
    progress(&format!(
        "waiting for the install lock {}",
        lock_path.display()
    ));
    fs4::FileExt::lock(&lock_file).map_err(|source| QuixUnavailable::Io {
        what: "locking",
        path: lock_path.clone(),
        source,
    })?;
    // Another process may have installed it while this one waited for the lock.
    let result = match probe_version(&python) {
        Ok(()) => Ok(()),
        Err(_) => install(&venv, &python, &cache, &progress),
    };
    // Closing the file also releases the lock; unlocking explicitly makes the order obvious.
    let _ = fs4::FileExt::unlock(&lock_file);
    result.map(|()| QuixEnv { python, script })
}

/// Creates the virtualenv (when its Python does not run) and pip-installs Quix; the caller
/// holds the install lock.
fn install(
    venv: &Path,
    python: &Path,
    cache: &Path,
    progress: &impl Fn(&str),
) -> Result<(), QuixUnavailable> {
    let log = cache.join(format!("quix-{QUIX_VERSION}-install.log"));
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| QuixUnavailable::Io {
                what: "opening the install log",
                path: log.clone(),
                source,
            })
    };
    // Truncate once per install so the tail in an error belongs to this attempt.
    File::create(&log).map_err(|source| QuixUnavailable::Io {
        what: "creating the install log",
        path: log.clone(),
        source,
    })?;

    if !runs(python) {
        progress(&format!("creating the virtualenv {}", venv.display()));
        let status = run_logged(
            Command::new(SYSTEM_PYTHON)
                .arg("-m")
                .arg("venv")
                .arg("--clear")
                .arg(venv),
            open_log()?,
            &log,
        )
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                QuixUnavailable::NoPython { source }
            }
            _ => QuixUnavailable::Io {
                what: "running python3 -m venv, log",
                path: log.clone(),
                source,
            },
        })?;
        if !status.success() {
            return Err(QuixUnavailable::Venv {
                venv: venv.to_owned(),
                status,
                tail: log_tail(&log, TAIL_LINES),
                log,
            });
        }
    }

    progress(&format!(
        "pip install quixstreams=={QUIX_VERSION} into {} (log: {})",
        venv.display(),
        log.display()
    ));
    let started = Instant::now();
    let status = run_logged(
        Command::new(python).args(pip_install_args()),
        open_log()?,
        &log,
    )
    .map_err(|source| QuixUnavailable::Io {
        what: "running pip in the virtualenv, log",
        path: log.clone(),
        source,
    })?;
    if !status.success() {
        return Err(QuixUnavailable::Pip {
            venv: venv.to_owned(),
            status,
            tail: log_tail(&log, TAIL_LINES),
            log,
        });
    }
    progress(&format!(
        "pip install took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    probe_version(python).map_err(|reason| QuixUnavailable::Import {
        python: python.to_owned(),
        reason,
        log,
    })
}

/// The arguments after the interpreter that install Quix into its virtualenv.
fn pip_install_args() -> Vec<String> {
    vec![
        "-m".into(),
        "pip".into(),
        "install".into(),
        "--disable-pip-version-check".into(),
        "--no-input".into(),
        format!("quixstreams=={QUIX_VERSION}"),
    ]
}

/// Runs `command` to completion with stdin closed and stdout and stderr appended to `log`.
fn run_logged(command: &mut Command, log: File, log_path: &Path) -> io::Result<ExitStatus> {
    let stderr = log.try_clone()?;
    tracing::info!(command = ?command, log = %log_path.display(), "running");
    command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .status()
}

/// Whether `python` exists and runs at all (a venv whose base interpreter vanished does not).
fn runs(python: &Path) -> bool {
    python.is_file()
        && Command::new(python)
            .arg("-c")
            .arg("pass")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// `Ok` when `python` imports quixstreams 3.28.1; otherwise what it reported.
fn probe_version(python: &Path) -> Result<(), String> {
    if !python.is_file() {
        return Err(format!("{} does not exist", python.display()));
    }
    let output = Command::new(python)
        .arg("-c")
        .arg(VERSION_PROBE)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {} failed: {e}", python.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match parse_version_output(&stdout) {
        Some(QUIX_VERSION) if output.status.success() => Ok(()),
        Some(other) if output.status.success() => Err(format!(
            "it has quixstreams {other}, expected {QUIX_VERSION}"
        )),
        _ => Err(format!(
            "`import quixstreams` failed ({}): {}",
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), TAIL_LINES)
        )),
    }
}

/// The version the probe printed: its last non-empty stdout line (imports may print first).
fn parse_version_output(stdout: &str) -> Option<&str> {
    stdout.lines().map(str::trim).rfind(|line| !line.is_empty())
}

/// What the Quix count app needs to run one benchmark case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuixCountArgs {
    /// `bootstrap.servers`.
    pub broker: String,
    /// The input topic; it must exist with explicit `retention.ms` and `retention.bytes`.
    pub input_topic: String,
    /// The output topic; it must exist.
    pub output_topic: String,
    /// The consumer group; its committed offsets tell the benchmark how far Quix is.
    pub group: String,
    /// Quix's `commit_interval` (its checkpoint period); `None` keeps Quix's default (5 s).
    pub commit_interval: Option<Duration>,
    /// Where the app's stdout and stderr go (created or truncated; parents created).
    pub log_path: PathBuf,
}

/// The command line after the interpreter: `-u <script> --broker ... --state-dir <dir>`.
fn count_command_args(script: &Path, args: &QuixCountArgs, state_dir: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec![
        // Unbuffered, so the log shows QUIX-READY and tracebacks as they happen.
        "-u".into(),
        script.into(),
        "--broker".into(),
        args.broker.as_str().into(),
        "--input".into(),
        args.input_topic.as_str().into(),
        "--output".into(),
        args.output_topic.as_str().into(),
        "--group".into(),
        args.group.as_str().into(),
        "--state-dir".into(),
        state_dir.into(),
    ];
    if let Some(interval) = args.commit_interval {
        out.push("--commit-interval".into());
        out.push(interval.as_secs_f64().to_string().into());
    }
    out
}

impl QuixEnv {
    /// The virtualenv's interpreter.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Starts the Quix count app (`examples/bench/quix_count.py`) with a fresh RocksDB state
    /// directory (deleted when the returned process is dropped).
    ///
    /// The child gets `SIGKILL` if this process dies, so a killed benchmark leaks no Python.
    pub fn spawn_count(&self, args: &QuixCountArgs) -> Result<QuixProcess, QuixUnavailable> {
        if !self.script.is_file() {
            return Err(QuixUnavailable::ScriptMissing {
                path: self.script.clone(),
            });
        }
        let log_path = args.log_path.clone();
        if let Some(dir) = log_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| QuixUnavailable::Io {
                what: "creating the Quix log directory",
                path: dir.to_owned(),
                source,
            })?;
        }
        let log = File::create(&log_path).map_err(|source| QuixUnavailable::Io {
            what: "creating the Quix log",
            path: log_path.clone(),
            source,
        })?;
        let log_error = |source| QuixUnavailable::Io {
            what: "duplicating the handle of the Quix log",
            path: log_path.clone(),
            source,
        };
        let stderr = log.try_clone().map_err(log_error)?;
        let state_dir = tempfile::Builder::new()
            .prefix("exactly-bench-quix-state-")
            .tempdir()
            .map_err(|source| QuixUnavailable::Io {
                what: "creating a state directory in",
                path: std::env::temp_dir(),
                source,
            })?;

        let mut command = Command::new(&self.python);
        command
            .args(count_command_args(&self.script, args, state_dir.path()))
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child =
            exactly_tests::process::spawn_with_parent_death_signal(command).map_err(|source| {
                QuixUnavailable::Spawn {
                    python: self.python.clone(),
                    log: log_path.clone(),
                    source,
                }
            })?;
        tracing::info!(pid = child.id(), log = %log_path.display(), group = %args.group, "started the Quix app");
        Ok(QuixProcess {
            child,
            status: None,
            log_path,
            _state_dir: state_dir,
        })
    }
}

/// How a stopped Quix process ended.
#[derive(Debug)]
pub struct QuixStopped {
    /// Its exit status (a clean `SIGTERM` stop is exit code 0).
    pub status: ExitStatus,
    /// Whether it ignored `SIGTERM` for the grace period and had to be `SIGKILL`ed.
    pub killed: bool,
    /// The last lines of its log.
    pub log_tail: String,
}

/// A running Quix count app. Dropping it kills (`SIGKILL`) and reaps the process.
#[derive(Debug)]
pub struct QuixProcess {
    child: Child,
    /// Set once reaped; from then on its pid is never signalled (it may be reused).
    status: Option<ExitStatus>,
    log_path: PathBuf,
    /// RocksDB state; removed on drop, after the process is gone.
    _state_dir: tempfile::TempDir,
}

impl QuixProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The app's log (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the app has printed `QUIX-READY` (its processing loop has started).
    pub fn is_ready(&self) -> bool {
        std::fs::read(&self.log_path)
            .map(|bytes| {
                String::from_utf8_lossy(&bytes)
                    .lines()
                    .any(|l| l.trim() == "QUIX-READY")
            })
            .unwrap_or(false)
    }

    /// `None` while the app runs; once it has exited, a description with its exit status, log
    /// path and last log lines.
    pub fn try_exit(&mut self) -> Option<String> {
        match self.poll_status() {
            Ok(None) => None,
            Ok(Some(status)) => Some(self.describe_exit(status)),
            Err(error) => Some(format!(
                "cannot tell whether the Quix app (pid {}) runs: {error}; log: {}",
                self.child.id(),
                self.log_path.display()
            )),
        }
    }

    /// Stops the app: `SIGTERM` (Quix commits its checkpoint and exits), then `SIGKILL` if it
    /// has not exited within 10 s. The process is always reaped.
    pub fn stop(mut self) -> Result<QuixStopped, QuixUnavailable> {
        let wait_error = |this: &Self, source| QuixUnavailable::Wait {
            pid: this.child.id(),
            log: this.log_path.clone(),
            source,
        };
        let mut killed = false;
        if self
            .poll_status()
            .map_err(|e| wait_error(&self, e))?
            .is_none()
        {
            // Unreaped, so the pid is still ours. A failure means it just exited.
            let _ = kill(self.nix_pid(), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while self
                .poll_status()
                .map_err(|e| wait_error(&self, e))?
                .is_none()
            {
                if Instant::now() >= deadline {
                    tracing::warn!(pid = self.child.id(), "Quix ignored SIGTERM; killing it");
                    let _ = kill(self.nix_pid(), Signal::SIGKILL);
                    killed = true;
                    let status = self.child.wait().map_err(|e| wait_error(&self, e))?;
                    self.status = Some(status);
                    break;
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        let status = match self.status {
            Some(status) => status,
            None => self.child.wait().map_err(|e| wait_error(&self, e))?,
        };
        Ok(QuixStopped {
            status,
            killed,
            log_tail: log_tail(&self.log_path, TAIL_LINES),
        })
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    fn poll_status(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    fn nix_pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn describe_exit(&self, status: ExitStatus) -> String {
        format!(
            "the Quix app (pid {}) exited: {status}; log: {}\n--- last lines ---\n{}",
            self.child.id(),
            self.log_path.display(),
            log_tail(&self.log_path, TAIL_LINES)
        )
    }
}

impl Drop for QuixProcess {
    fn drop(&mut self) {
        if matches!(self.poll_status(), Ok(Some(_))) {
            return;
        }
        let _ = kill(self.nix_pid(), Signal::SIGKILL);
        // Blocking, but only for the moment the kernel needs to tear down a killed process.
        if let Err(error) = self.child.wait() {
            tracing::warn!(pid = self.child.id(), %error, "could not reap the Quix app");
        }
    }
}

/// The last `lines` lines of the file at `path`, or why it cannot be read.
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(commit_interval: Option<Duration>) -> QuixCountArgs {
        QuixCountArgs {
            broker: "127.0.0.1:9092".into(),
            input_topic: "in".into(),
            output_topic: "out".into(),
            group: "g".into(),
            commit_interval,
            log_path: "/tmp/quix.log".into(),
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_args_name_every_topic_group_and_the_state_dir() {
        let got = strings(count_command_args(
            Path::new("/src/quix_count.py"),
            &args(None),
            Path::new("/tmp/state"),
        ));
        assert_eq!(
            got,
            [
                "-u",
                "/src/quix_count.py",
                "--broker",
                "127.0.0.1:9092",
                "--input",
                "in",
                "--output",
                "out",
                "--group",
                "g",
                "--state-dir",
                "/tmp/state"
            ]
        );
    }

    #[test]
    fn commit_interval_is_passed_in_fractional_seconds() {
        let got = strings(count_command_args(
            Path::new("s.py"),
            &args(Some(Duration::from_millis(250))),
            Path::new("d"),
        ));
        assert_eq!(got[got.len() - 2..], ["--commit-interval", "0.25"]);
        let got = strings(count_command_args(
            Path::new("s.py"),
            &args(Some(Duration::from_secs(5))),
            Path::new("d"),
        ));
        assert_eq!(got[got.len() - 2..], ["--commit-interval", "5"]);
    }

    #[test]
    fn version_is_the_last_non_empty_stdout_line() {
        assert_eq!(parse_version_output("3.28.1\n"), Some("3.28.1"));
        assert_eq!(
            parse_version_output("some banner\n  3.28.1  \n\n"),
            Some("3.28.1")
        );
        assert_eq!(parse_version_output(""), None);
        assert_eq!(parse_version_output("\n \n"), None);
    }

    #[test]
    fn pip_installs_exactly_the_pinned_version() {
        let pip = pip_install_args();
        assert_eq!(pip[..3], ["-m", "pip", "install"]);
        assert_eq!(pip.last().map(String::as_str), Some("quixstreams==3.28.1"));
    }

    #[test]
    fn the_script_ships_in_the_source_tree() {
        assert!(script_path().is_file(), "{}", script_path().display());
    }

    #[test]
    fn probing_a_missing_interpreter_says_so() {
        let err = probe_version(Path::new("/nonexistent/bin/python")).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }

    /// A `QuixEnv` whose "python" is a shell script running `body` (it ignores the app's
    /// arguments): the process handling is tested without pip.
    fn fake_env(dir: &Path, body: &str) -> QuixEnv {
        use std::os::unix::fs::PermissionsExt;
        let python = dir.join("fake-python");
        std::fs::write(&python, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        QuixEnv {
            python,
            script: script_path(),
        }
    }

    fn fake_args(dir: &Path) -> QuixCountArgs {
        QuixCountArgs {
            log_path: dir.join("logs").join("quix.log"),
            ..args(None)
        }
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    #[test]
    fn a_running_app_is_ready_and_stops_on_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let env = fake_env(dir.path(), "echo QUIX-READY\nexec sleep 1000");
        let mut quix = env.spawn_count(&fake_args(dir.path())).unwrap();
        wait_until("QUIX-READY", || quix.is_ready());
        assert_eq!(quix.try_exit(), None);
        let stopped = quix.stop().unwrap();
        assert!(!stopped.killed);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&stopped.status),
            Some(Signal::SIGTERM as i32)
        );
    }

    #[test]
    fn an_exited_app_is_described_with_status_and_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let env = fake_env(dir.path(), "echo boom: no broker >&2\nexit 3");
        let mut quix = env.spawn_count(&fake_args(dir.path())).unwrap();
        let mut exit = None;
        wait_until("the exit", || {
            exit = quix.try_exit();
            exit.is_some()
        });
        let exit = exit.unwrap();
        assert!(exit.contains("exit status: 3"), "{exit}");
        assert!(exit.contains("boom: no broker"), "{exit}");
        // Still described after the reap, and stopping an exited app just reports it.
        assert_eq!(quix.try_exit(), Some(exit));
        assert_eq!(quix.stop().unwrap().status.code(), Some(3));
    }

    #[test]
    fn dropping_the_handle_kills_and_reaps_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let env = fake_env(dir.path(), "exec sleep 1000");
        let quix = env.spawn_count(&fake_args(dir.path())).unwrap();
        let pid = Pid::from_raw(quix.pid() as i32);
        drop(quix);
        // Reaped, so the pid no longer exists (not even as a zombie).
        assert_eq!(kill(pid, None), Err(nix::errno::Errno::ESRCH));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
