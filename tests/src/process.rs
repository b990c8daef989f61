//! Process harness: runs service binaries as child processes that a test can crash
//! (`SIGKILL`), freeze (`SIGSTOP`/`SIGCONT`), stop politely (`SIGTERM`) and restart, with their
//! output kept in a log file.
//!
//! Guarantees:
//! - **Only our own pids are signalled.** A child is signalled only while it has not been
//!   reaped (a zombie keeps its pid reserved), and every reap goes through this module, so a
//!   recycled pid can never be hit.
//! - **Every child is reaped** when its [`ChildProcess`] (or the [`Supervisor`] holding it) is
//!   dropped, including during a panic unwind: `SIGCONT` if paused, `SIGKILL`, `wait`.
//! - **No orphan survives the test process**, even if that process dies without unwinding
//!   (`SIGKILL` from a test timeout, `abort`): children are spawned with
//!   `PR_SET_PDEATHSIG = SIGKILL`. Linux sends that signal when the *thread* that forked the
//!   child exits, not the process, so forking from a short-lived thread (a tokio blocking-pool
//!   thread is retired after 10 s idle, a `#[tokio::test]` thread ends with the test) would
//!   kill children at random later moments. Every spawn therefore goes through one dedicated
//!   spawner thread that lives as long as the process.
//!
//! ```no_run
//! # async fn demo() -> Result<(), exactly_tests::process::ProcessError> {
//! use std::time::Duration;
//! use exactly_tests::process::{ProcessSpec, Supervisor};
//!
//! let mut services = Supervisor::new();
//! let spec = ProcessSpec::new("target/debug/my-service").arg("--brokers").arg("127.0.0.1:9092");
//! let svc = services.spawn("svc-a", spec)?;
//! svc.wait_for_log("ready", Duration::from_secs(30)).await?;
//! svc.kill_hard().await?;
//! svc.restart()?;
//! svc.wait_for_log("ready", Duration::from_secs(30)).await?;
//! # Ok(()) }
//! ```

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often waits poll the child's state and its log file.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How many log lines error messages quote.
const TAIL_LINES: usize = 30;

/// How long [`ChildProcess::kill_hard`] waits for the kernel to reap a `SIGKILL`ed child. A
/// process in uninterruptible sleep can take a moment; anything longer is a kernel problem.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the process harness. Each names the child and its log file.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log file could not be created or written.
    #[error("cannot open log file {} for {name}: {source}", path.display())]
    LogFile {
        /// Name of the child.
        name: String,
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The program could not be started.
    #[error("cannot start {name} ({program}): {source}; log: {}", log.display())]
    Spawn {
        /// Name of the child.
        name: String,
        /// The program as given to [`ProcessSpec::new`].
        program: String,
        /// The log file.
        log: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending a signal failed.
    #[error("cannot send {signal} to {name} (pid {pid}): {source}; log: {}", log.display())]
    Signal {
        /// Name of the child.
        name: String,
        /// Its pid.
        pid: u32,
        /// The signal.
        signal: Signal,
        /// The log file.
        log: PathBuf,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// The operation needs a running child, but it has exited.
    #[error("{name} is not running (it exited: {status}); log: {}\n--- last lines ---\n{tail}", log.display())]
    NotRunning {
        /// Name of the child.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// The log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// `waitpid` failed.
    #[error("waiting for {name} (pid {pid}) failed: {source}; log: {}", log.display())]
    Wait {
        /// Name of the child.
        name: String,
        /// Its pid.
        pid: u32,
        /// The log file.
        log: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No matching log line appeared before the deadline.
    #[error("{name} logged no line matching {what} within {timeout:?}; log: {}\n--- last lines ---\n{tail}", log.display())]
    LogTimeout {
        /// Name of the child.
        name: String,
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
        /// The log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// The child exited while a test waited for a log line.
    #[error("{name} exited ({status}) before logging a line matching {what}; log: {}\n--- last lines ---\n{tail}", log.display())]
    ExitedWhileWaiting {
        /// Name of the child.
        name: String,
        /// What was waited for.
        what: String,
        /// How it exited.
        status: ExitStatus,
        /// The log file.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// The child did not exit before the deadline.
    #[error("{name} (pid {pid}) did not exit within {timeout:?}; log: {}", log.display())]
    ExitTimeout {
        /// Name of the child.
        name: String,
        /// Its pid.
        pid: u32,
        /// How long.
        timeout: Duration,
        /// The log file.
        log: PathBuf,
    },
    /// The log file could not be read.
    #[error("cannot read log file {} of {name}: {source}", path.display())]
    ReadLog {
        /// Name of the child.
        name: String,
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A [`Supervisor`] already holds a child with this name.
    #[error("a process named {0:?} is already supervised")]
    DuplicateName(String),
    /// A [`Supervisor`] holds no child with this name.
    #[error("no supervised process is named {0:?}")]
    UnknownName(String),
}

/// What to run: program, arguments, environment, working directory and log file.
///
/// The child's stdin is `/dev/null`; stdout and stderr are both appended to the log file.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    current_dir: Option<PathBuf>,
    log_path: Option<PathBuf>,
}

impl ProcessSpec {
    /// A spec for `program` (a path, or a name looked up on `PATH`).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        ProcessSpec {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            current_dir: None,
            log_path: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends several arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the child (on top of the inherited environment).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an inherited environment variable from the child's environment.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// Sets the child's working directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.current_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Appends the child's output to this file (created if missing). Without it the log goes
    /// to a fresh file in [`default_log_dir`].
    pub fn log_file(mut self, path: impl AsRef<Path>) -> Self {
        self.log_path = Some(path.as_ref().to_owned());
        self
    }

    /// The command line for messages: program and arguments.
    fn display_command(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn command(&self, log: &File) -> io::Result<Command> {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, value) in &self.envs {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        Ok(command)
    }
}

/// Where child logs go when a [`ProcessSpec`] names no log file: `$EXACTLY_TEST_LOG_DIR`, else
/// `<temp dir>/exactly-tests-logs`. The files are kept after the test for inspection.
pub fn default_log_dir() -> PathBuf {
    match std::env::var_os("EXACTLY_TEST_LOG_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join("exactly-tests-logs"),
    }
}

/// A log file name no other child of any test process uses: name, pid, time, counter.
fn fresh_log_path(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    default_log_dir().join(format!("{safe}-{}-{millis}-{n}.log", std::process::id()))
}

/// One request to the spawner thread: the command and where to send the spawned child.
struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `command` so that the child is `SIGKILL`ed when this process dies, however it dies
/// (`PR_SET_PDEATHSIG`, set from one process-lifetime spawner thread; see the module docs for
/// why the thread matters). For launchers that manage a [`Child`] themselves (the broker);
/// the caller still owns reaping it.
pub fn spawn_with_parent_death_signal(mut command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("exactly-tests-spawner".into())
            // The sender lives in a static, so this loop never ends before the process does.
            .spawn(move || {
                for mut request in requests {
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .ok()
            .map(|_| sender)
    });
    let Some(sender) = sender else {
        return Err(io::Error::other(
            "the exactly-tests spawner thread could not be started",
        ));
    };

    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes two raw syscalls
    // (prctl, getppid) and builds errors without allocating: async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|errno| io::Error::from_raw_os_error(errno as i32))?;
            // The parent may have died before prctl took effect; then no signal will come.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::from_raw_os_error(
                    nix::errno::Errno::ESRCH as i32,
                ));
            }
            Ok(())
        });
    }
    let (reply, response) = mpsc::channel();
    sender
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("the exactly-tests spawner thread is gone"))?;
    response
        .recv()
        .map_err(|_| io::Error::other("the exactly-tests spawner thread dropped a request"))?
}

/// A child process started from a [`ProcessSpec`], with its log file.
///
/// Dropping it kills (`SIGKILL`) and reaps the child if it still runs.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    spec: ProcessSpec,
    log_path: PathBuf,
    child: Child,
    /// Set once the current run has been reaped; from then on its pid is never signalled.
    status: Option<ExitStatus>,
    paused: bool,
    /// Byte offset in the log where the current run's output starts.
    run_start: u64,
    runs: u32,
}

impl ChildProcess {
    /// Starts `spec` as a child named `name` (the name is for messages and log file names).
    ///
    /// A marker line naming the run and the command is appended to the log before the child
    /// starts.
    pub fn spawn(name: impl Into<String>, spec: ProcessSpec) -> Result<ChildProcess, ProcessError> {
        let name = name.into();
        let log_path = spec
            .log_path
            .clone()
            .unwrap_or_else(|| fresh_log_path(&name));
        let (child, run_start) = start_run(&name, &spec, &log_path, 1)?;
        Ok(ChildProcess {
            name,
            spec,
            log_path,
            child,
            status: None,
            paused: false,
            run_start,
            runs: 1,
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file: output of every run, each preceded by a marker line.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The pid of the current run, or `None` once it has exited and been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.status.is_none().then(|| self.child.id())
    }

    /// How many times the child has been started (1 + restarts).
    pub fn runs(&self) -> u32 {
        self.runs
    }

    /// Whether the current run is still alive (a paused child counts as running). Reaps it if
    /// it has exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Whether the child is stopped by [`ChildProcess::pause`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The exit status if the current run has exited (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    self.paused = false;
                }
                Ok(None) => {}
                Err(source) => return Err(self.wait_error(source)),
            }
        }
        Ok(self.status)
    }

    /// Crashes the child: `SIGKILL`, then reaps it. Returns its exit status (already exited
    /// children just report theirs).
    pub async fn kill_hard(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.send(Signal::SIGKILL)?;
        self.paused = false;
        self.wait_exit(KILL_REAP_TIMEOUT).await
    }

    /// Freezes the child with `SIGSTOP` (it keeps its sockets open but does nothing: a GC
    /// pause, a zombie instance).
    pub fn pause(&mut self) -> Result<(), ProcessError> {
        self.ensure_running()?;
        self.send(Signal::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// Lets a paused child continue with `SIGCONT`.
    pub fn resume(&mut self) -> Result<(), ProcessError> {
        self.ensure_running()?;
        self.send(Signal::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    /// Asks the child to stop with `SIGTERM` (continuing it first if paused, so it can act on
    /// the signal), waits up to `grace` for it to exit, then `SIGKILL`s it. Returns the exit
    /// status: a signal-9 status means it did not stop within `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.send(Signal::SIGTERM)?;
        if self.paused {
            self.send(Signal::SIGCONT)?;
            self.paused = false;
        }
        match self.wait_exit(grace).await {
            Ok(status) => Ok(status),
            Err(ProcessError::ExitTimeout { .. }) => {
                tracing::warn!(name = %self.name, ?grace, "child ignored SIGTERM, sending SIGKILL");
                self.kill_hard().await
            }
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the child to exit on its own; returns its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ProcessError::ExitTimeout {
                    name: self.name.clone(),
                    pid: self.child.id(),
                    timeout,
                    log: self.log_path.clone(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// Starts the same command again, appending to the same log after a marker line. A child
    /// that still runs is killed (`SIGKILL`) and reaped first.
    pub fn restart(&mut self) -> Result<(), ProcessError> {
        if self.try_status()?.is_none() {
            self.send(Signal::SIGKILL)?;
            let status = self
                .child
                .wait()
                .map_err(|source| self.wait_error(source))?;
            self.status = Some(status);
        }
        let (child, run_start) = start_run(&self.name, &self.spec, &self.log_path, self.runs + 1)?;
        self.child = child;
        self.status = None;
        self.paused = false;
        self.run_start = run_start;
        self.runs += 1;
        Ok(())
    }

    /// Waits until the current run logs a line containing `pattern`; returns that line.
    ///
    /// Only the current run's output counts (after the last restart), so waiting for a
    /// "ready" line after [`ChildProcess::restart`] does not match the previous run's line.
    /// Fails early if the child exits first.
    pub async fn wait_for_log(
        &mut self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, ProcessError> {
        self.wait_for_log_line(
            &format!("{pattern:?}"),
            |line| line.contains(pattern),
            timeout,
        )
        .await
    }

    /// Like [`ChildProcess::wait_for_log`] with a predicate on each line; `what` describes
    /// it in errors.
    pub async fn wait_for_log_line(
        &mut self,
        what: &str,
        mut predicate: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the status before the log: output written before exit is then visible.
            let status = self.try_status()?;
            let text = self.run_log_text_async().await?;
            if let Some(line) = text.lines().find(|line| predicate(line)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = status {
                return Err(ProcessError::ExitedWhileWaiting {
                    name: self.name.clone(),
                    what: what.to_owned(),
                    status,
                    log: self.log_path.clone(),
                    tail: tail(&text, TAIL_LINES),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ProcessError::LogTimeout {
                    name: self.name.clone(),
                    what: what.to_owned(),
                    timeout,
                    log: self.log_path.clone(),
                    tail: tail(&text, TAIL_LINES),
                });
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// The whole log: every run's output with the marker lines.
    pub fn log_text(&self) -> Result<String, ProcessError> {
        let bytes = std::fs::read(&self.log_path).map_err(|source| self.read_error(source))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The current run's output only (since the last start or restart).
    pub fn run_log_text(&self) -> Result<String, ProcessError> {
        let bytes = std::fs::read(&self.log_path).map_err(|source| self.read_error(source))?;
        Ok(self.current_run(&bytes))
    }

    /// The last `lines` lines of the whole log, for messages.
    pub fn log_tail(&self, lines: usize) -> String {
        match self.log_text() {
            Ok(text) => tail(&text, lines),
            Err(e) => e.to_string(),
        }
    }

    async fn run_log_text_async(&self) -> Result<String, ProcessError> {
        let path = self.log_path.clone();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(|e| self.read_error(io::Error::other(e)))?
            .map_err(|source| self.read_error(source))?;
        Ok(self.current_run(&bytes))
    }

    fn current_run(&self, bytes: &[u8]) -> String {
        let start = usize::try_from(self.run_start)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn ensure_running(&mut self) -> Result<(), ProcessError> {
        match self.try_status()? {
            None => Ok(()),
            Some(status) => Err(ProcessError::NotRunning {
                name: self.name.clone(),
                status,
                log: self.log_path.clone(),
                tail: self.log_tail(TAIL_LINES),
            }),
        }
    }

    /// Signals the current run. Callers have just seen it unreaped, so the pid is still ours.
    fn send(&self, signal: Signal) -> Result<(), ProcessError> {
        debug_assert!(self.status.is_none(), "signalling a reaped child");
        let pid = self.child.id();
        kill(Pid::from_raw(pid as i32), signal).map_err(|source| ProcessError::Signal {
            name: self.name.clone(),
            pid,
            signal,
            log: self.log_path.clone(),
            source,
        })
    }

    fn wait_error(&self, source: io::Error) -> ProcessError {
        ProcessError::Wait {
            name: self.name.clone(),
            pid: self.child.id(),
            log: self.log_path.clone(),
            source,
        }
    }

    fn read_error(&self, source: io::Error) -> ProcessError {
        ProcessError::ReadLog {
            name: self.name.clone(),
            path: self.log_path.clone(),
            source,
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.status.is_some() || matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.paused {
            let _ = kill(pid, Signal::SIGCONT);
        }
        let _ = kill(pid, Signal::SIGKILL);
        // Blocking, but only for the moment the kernel needs to tear down a SIGKILLed process.
        if let Err(error) = self.child.wait() {
            tracing::warn!(name = %self.name, %pid, %error, "could not reap child");
        }
    }
}

/// Writes the run marker and spawns the child; returns it and the log offset its output
/// starts at.
fn start_run(
    name: &str,
    spec: &ProcessSpec,
    log_path: &Path,
    run: u32,
) -> Result<(Child, u64), ProcessError> {
    let log_error = |source| ProcessError::LogFile {
        name: name.to_owned(),
        path: log_path.to_owned(),
        source,
    };
    if let Some(dir) = log_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(log_error)?;
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(log_error)?;
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    writeln!(
        log,
        "===== exactly-tests: {name} run {run} at unix-ms {millis}: {} =====",
        spec.display_command()
    )
    .map_err(log_error)?;
    let run_start = log.metadata().map_err(log_error)?.len();
    let command = spec.command(&log).map_err(log_error)?;
    let child = spawn_with_parent_death_signal(command).map_err(|source| ProcessError::Spawn {
        name: name.to_owned(),
        program: spec.program.to_string_lossy().into_owned(),
        log: log_path.to_owned(),
        source,
    })?;
    tracing::info!(name, pid = child.id(), run, log = %log_path.display(), "started child process");
    Ok((child, run_start))
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A named set of child processes, all killed and reaped when it is dropped.
///
/// Children are kept in the order they were added.
#[derive(Debug, Default)]
pub struct Supervisor {
    children: Vec<ChildProcess>,
}

impl Supervisor {
    /// An empty supervisor.
    pub fn new() -> Self {
        Supervisor::default()
    }

    /// Starts `spec` as a child called `name`; names must be unique within the supervisor.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        spec: ProcessSpec,
    ) -> Result<&mut ChildProcess, ProcessError> {
        let name = name.into();
        if self.get(&name).is_some() {
            return Err(ProcessError::DuplicateName(name));
        }
        let child = ChildProcess::spawn(name, spec)?;
        self.children.push(child);
        Ok(self.children.last_mut().expect("just pushed"))
    }

    /// The child called `name`.
    pub fn get(&self, name: &str) -> Option<&ChildProcess> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The child called `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut ChildProcess> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// The child called `name`, or [`ProcessError::UnknownName`].
    pub fn child(&mut self, name: &str) -> Result<&mut ChildProcess, ProcessError> {
        self.get_mut(name)
            .ok_or_else(|| ProcessError::UnknownName(name.to_owned()))
    }

    /// The names of all children, in the order they were added.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.children.iter().map(|c| c.name.as_str())
    }

    /// All children, mutably (e.g. to check every one still runs).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut ChildProcess> {
        self.children.iter_mut()
    }

    /// Takes the child called `name` out of the supervisor (it is reaped when that handle is
    /// dropped).
    pub fn remove(&mut self, name: &str) -> Option<ChildProcess> {
        let index = self.children.iter().position(|c| c.name == name)?;
        Some(self.children.remove(index))
    }

    /// Kills (`SIGKILL`) and reaps every child; returns each name with its exit status. The
    /// children stay in the supervisor and can be restarted.
    pub async fn kill_all(&mut self) -> Result<Vec<(String, ExitStatus)>, ProcessError> {
        let mut statuses = Vec::with_capacity(self.children.len());
        for child in &mut self.children {
            let status = child.kill_hard().await?;
            statuses.push((child.name.clone(), status));
        }
        Ok(statuses)
    }

    /// One line per child with its name, pid (or exit status) and log file: handy in a
    /// failing test's message.
    pub fn describe(&mut self) -> String {
        self.children
            .iter_mut()
            .map(|c| {
                let state = match c.try_status() {
                    Ok(None) => format!("running as pid {}", c.child.id()),
                    Ok(Some(status)) => format!("exited: {status}"),
                    Err(e) => format!("unknown: {e}"),
                };
                format!("{}: {state}; log {}", c.name, c.log_path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
