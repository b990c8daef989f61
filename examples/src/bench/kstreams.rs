//! Kafka Streams 4.4, the JVM peer the benchmark measures against.
//!
//! [`prepare`] makes sure the app is built in the harness cache
//! (`${EXACTLY_CACHE_DIR:-~/.cache/exactly}/kstreams-4.4.0`): Maven copies the runtime classpath
//! of `examples/bench/kstreams/pom.xml` (Kafka Streams, Jackson, log4j) into `lib/`, and `javac`
//! compiles `examples/bench/kstreams/KStreamsCount.java` into `classes/`, under a file lock, once
//! per version of those files (about a minute with a cold Maven cache). [`KStreamsEnv::spawn_count`]
//! then starts the app: the same stateful per-key count and sum the benchmark runs on `exactly`,
//! with `processing.guarantee=exactly_once_v2` and RocksDB state in a fresh directory.
//!
//! Whatever fails, the error says why (no Java 17 or Maven, the Maven or javac run with its log
//! tail): the benchmark reports it instead of a number.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use exactly_tests::process::{ChildProcess, ProcessSpec};

/// The Kafka Streams version the benchmark measures.
pub const KSTREAMS_VERSION: &str = "4.4.0";

const POM: &str = include_str!("../../bench/kstreams/pom.xml");
const SOURCE: &str = include_str!("../../bench/kstreams/KStreamsCount.java");
const LOG4J2: &str = include_str!("../../bench/kstreams/log4j2.properties");

/// Why Kafka Streams cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum KStreamsUnavailable {
    /// A tool is missing.
    #[error("{tool} is not available ({why}): the Kafka Streams case needs a JDK 17+ (java, javac) and Maven")]
    Missing {
        /// `java`, `javac` or `mvn`.
        tool: &'static str,
        /// What running it said.
        why: String,
    },
    /// Maven or javac failed.
    #[error("{step} failed ({status}); log {}:\n{tail}", log.display())]
    Build {
        /// What ran.
        step: &'static str,
        /// Its exit status.
        status: String,
        /// Its full log.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// A file operation in the cache failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The app could not be started.
    #[error("starting the Kafka Streams app: {0}")]
    Spawn(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KStreamsUnavailable {
    let path = path.to_owned();
    move |source| KStreamsUnavailable::Io { what, path, source }
}

/// A built Kafka Streams count app.
#[derive(Debug, Clone)]
pub struct KStreamsEnv {
    root: PathBuf,
}

/// What one run of the count app reads, writes and is called.
#[derive(Debug, Clone)]
pub struct KStreamsCountArgs {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// Input topic.
    pub input: String,
    /// Output topic.
    pub output: String,
    /// `application.id`: also its consumer group.
    pub application_id: String,
    /// Stream threads.
    pub threads: usize,
    /// Where its output goes.
    pub log_path: PathBuf,
}

/// Builds the app if this version of it is not built yet; `say` reports what takes time.
pub fn prepare(say: impl Fn(&str)) -> Result<KStreamsEnv, KStreamsUnavailable> {
    let root = exactly_tests::kafka::cache_dir().join(format!("kstreams-{KSTREAMS_VERSION}"));
    std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
    let lock_path = root.join("build.lock");
    let lock = std::fs::File::create(&lock_path).map_err(io("creating", &lock_path))?;
    fs4::FileExt::lock(&lock).map_err(io("locking", &lock_path))?;
    let stamp = format!("{POM}\n{SOURCE}\n{LOG4J2}");
    let complete = root.join(".complete");
    if std::fs::read_to_string(&complete).ok().as_deref() != Some(stamp.as_str()) {
        say(&format!(
            "building the Kafka Streams {KSTREAMS_VERSION} app in {} (once; Maven fetches about 100 MB)",
            root.display()
        ));
        build(&root)?;
        std::fs::write(&complete, &stamp).map_err(io("writing", &complete))?;
    }
    Ok(KStreamsEnv { root })
}

/// Fetches the classpath with Maven and compiles the app into `lib/` and `classes/`.
fn build(root: &Path) -> Result<(), KStreamsUnavailable> {
    for (tool, flag) in [("java", "-version"), ("javac", "-version"), ("mvn", "-v")] {
        let ran = Command::new(tool).arg(flag).stdin(Stdio::null()).output();
        if let Err(e) = ran {
            return Err(KStreamsUnavailable::Missing {
                tool,
                why: e.to_string(),
            });
        }
    }
    let write = |name: &str, text: &str| {
        let path = root.join(name);
        std::fs::write(&path, text).map_err(io("writing", &path))
    };
    write("pom.xml", POM)?;
    write("KStreamsCount.java", SOURCE)?;
    write("log4j2.properties", LOG4J2)?;
    for dir in ["lib", "classes"] {
        let path = root.join(dir);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(io("removing", &path))?;
        }
    }
    let mut maven = Command::new("mvn");
    maven
        .current_dir(root)
        .args(["-B", "-f", "pom.xml"])
        .arg(format!("-Dmaven.repo.local={}", root.join("m2").display()))
        .args([
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            "-DoutputDirectory=lib",
        ]);
    run_logged(
        "Maven (dependency:copy-dependencies)",
        maven,
        &root.join("maven.log"),
    )?;
    let mut javac = Command::new("javac");
    javac.current_dir(root).args([
        "--release",
        "17",
        "-d",
        "classes",
        "-cp",
        "lib/*",
        "KStreamsCount.java",
    ]);
    run_logged("javac", javac, &root.join("javac.log"))
}

fn run_logged(
    step: &'static str,
    mut command: Command,
    log: &Path,
) -> Result<(), KStreamsUnavailable> {
    let file = std::fs::File::create(log).map_err(io("creating", log))?;
    let err = file.try_clone().map_err(io("opening", log))?;
    let status = command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(io("running for", log))?;
    if status.success() {
        return Ok(());
    }
    Err(KStreamsUnavailable::Build {
        step,
        status: status.to_string(),
        log: log.to_owned(),
        tail: exactly_tests::kafka::log_tail(log, 20),
    })
}

/// A restore of the count app's store from its changelog.
#[derive(Debug, Clone)]
pub struct KStreamsRestore {
    /// From the start of the restore to its end, as Kafka Streams' restore listener saw it.
    pub restore: Duration,
    /// From the process start (JVM start-up and group join included) to the end of the
    /// restore.
    pub ready_after_start: Duration,
    /// Changelog records restored.
    pub records: u64,
}

/// Parses the app's `KSTREAMS-RESTORED ... records=N ms=T` line.
pub fn parse_restored(line: &str) -> Option<(u64, Duration)> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .and_then(|v| v.parse::<i64>().ok())
    };
    let records = u64::try_from(field("records=")?).ok()?;
    let ms = u64::try_from(field("ms=")?).ok()?;
    Some((records, Duration::from_millis(ms)))
}

impl KStreamsEnv {
    /// Starts the count app with a fresh state directory, returned with it: keep the directory
    /// until the process has stopped (dropping it removes the directory).
    pub fn spawn_count(
        &self,
        args: &KStreamsCountArgs,
    ) -> Result<(ChildProcess, tempfile::TempDir), KStreamsUnavailable> {
        let state_dir = tempfile::Builder::new()
            .prefix("exactly-bench-kstreams-state-")
            .tempdir()
            .map_err(io("creating a state directory in", &std::env::temp_dir()))?;
        let classpath = format!(
            "{}:{}/*",
            self.root.join("classes").display(),
            self.root.join("lib").display()
        );
        let spec = ProcessSpec::new("java")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.root.join("log4j2.properties").display()
            ))
            .args(["-cp", &classpath, "bench.KStreamsCount"])
            .args([
                &args.bootstrap,
                &args.input,
                &args.output,
                &args.application_id,
            ])
            .arg(state_dir.path())
            .arg(args.threads.to_string())
            .log_file(&args.log_path);
        let process = ChildProcess::spawn(format!("kstreams-{}", args.threads), spec)
            .map_err(|e| KStreamsUnavailable::Spawn(e.to_string()))?;
        Ok((process, state_dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restore_line_parses() {
        let line = "KSTREAMS-RESTORED store=totals partition=app-totals-changelog-0 records=100000 ms=2345";
        assert_eq!(
            parse_restored(line),
            Some((100_000, Duration::from_millis(2345)))
        );
        assert_eq!(parse_restored("KSTREAMS-RESTORED records=5 ms=-1"), None);
    }
}
