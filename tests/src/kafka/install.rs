//! Getting Apache Kafka onto the machine: its jars, fetched once with Maven into the cache
//! directory, and pre-formatted KRaft storage that every node copies instead of running
//! `kafka-storage format` (a JVM start) each time.
//!
//! Layout under `<cache_dir>/kafka-4.4.0/`:
//! - `pom.xml`: the checked-in `tests/kafka/pom.xml`;
//! - `lib/`: the broker's runtime classpath, and `lib/.complete` naming the pom it came from;
//! - `log4j2.properties`: the checked-in `tests/kafka/log4j2.properties`;
//! - `formatted/node-N/`: storage formatted for node id N (static quorum: it names no port,
//!   so one copy serves every cluster);
//! - `m2/`: Maven's local repository;
//! - `install.lock`: held while any of this is written, so concurrent processes install once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use crate::error::HarnessError;

/// The Apache Kafka version every test runs against.
pub const KAFKA_VERSION: &str = "4.4.0";

/// The oldest Java the broker runs on.
const MIN_JAVA: u32 = 17;

/// The checked-in pom whose dependencies are the broker's classpath.
const POM: &str = include_str!("../../kafka/pom.xml");

/// The broker's log configuration.
const LOG4J2: &str = include_str!("../../kafka/log4j2.properties");

/// The cluster id written into formatted storage. Clusters on one machine never talk to each
/// other, so they can share it (a cluster id is 16 bytes, unpadded base64url).
pub(crate) const CLUSTER_ID: &str = "ZXhhY3RseS10ZXN0cy0wMQ";

/// The cache directory of the harness: `$EXACTLY_CACHE_DIR`, else `$HOME/.cache/exactly`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EXACTLY_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache").join("exactly")
}

/// A usable Kafka installation: a Java to run it with and its classpath.
#[derive(Debug)]
pub struct Installation {
    /// `<cache_dir>/kafka-4.4.0`.
    pub root: PathBuf,
    /// The `java` executable (`$JAVA_HOME/bin/java` when set, else `java` on `PATH`).
    pub java: PathBuf,
    /// The broker's classpath, `:`-separated.
    pub classpath: String,
    /// The log4j2 configuration file the nodes use.
    pub log4j_config: PathBuf,
}

/// The installation, fetched with Maven on first use (about a minute), under a file lock.
///
/// Errors name what is missing: Java 17+ or Maven, or the Maven run that failed with its log.
pub fn installation() -> Result<&'static Installation, HarnessError> {
    static INSTALLED: OnceLock<Installation> = OnceLock::new();
    if let Some(installed) = INSTALLED.get() {
        return Ok(installed);
    }
    let installed = install()?;
    Ok(INSTALLED.get_or_init(|| installed))
}

fn install() -> Result<Installation, HarnessError> {
    let java = java_executable();
    check_java(&java)?;
    let root = cache_dir().join(format!("kafka-{KAFKA_VERSION}"));
    create_dir(&root)?;
    let _lock = InstallLock::acquire(&root.join("install.lock"))?;
    let lib = root.join("lib");
    if !lib_is_complete(&lib) {
        fetch_jars(&root)?;
    }
    let log4j_config = root.join("log4j2.properties");
    write_if_changed(&log4j_config, LOG4J2)?;
    let classpath = classpath(&lib)?;
    Ok(Installation {
        root,
        java,
        classpath,
        log4j_config,
    })
}

/// `$JAVA_HOME/bin/java` when `JAVA_HOME` is set, else `java` (looked up on `PATH`).
fn java_executable() -> PathBuf {
    match std::env::var_os("JAVA_HOME").filter(|home| !home.is_empty()) {
        Some(home) => PathBuf::from(home).join("bin").join("java"),
        None => PathBuf::from("java"),
    }
}

/// Checks that `java` runs and is at least [`MIN_JAVA`].
fn check_java(java: &Path) -> Result<(), HarnessError> {
    let output = Command::new(java)
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            HarnessError::KafkaUnavailable(format!(
                "cannot run `{} -version` ({e}): the local Apache Kafka broker needs Java \
                 {MIN_JAVA} or newer (Debian/Ubuntu: apt-get install openjdk-{MIN_JAVA}-jdk-headless; \
                 or set JAVA_HOME), or run against your own cluster with --brokers",
                java.display()
            ))
        })?;
    // `java -version` prints to stderr: `openjdk version "17.0.15" 2025-04-15`.
    let text = String::from_utf8_lossy(&output.stderr);
    match parse_java_major(&text) {
        Some(major) if major >= MIN_JAVA => Ok(()),
        Some(major) => Err(HarnessError::KafkaUnavailable(format!(
            "{} is Java {major}; Apache Kafka {KAFKA_VERSION} needs Java {MIN_JAVA} or newer \
             (set JAVA_HOME to a newer JDK)",
            java.display()
        ))),
        None => Err(HarnessError::KafkaUnavailable(format!(
            "cannot tell the version of {} from `java -version`: {:?}",
            java.display(),
            text.trim()
        ))),
    }
}

/// The major version in `java -version` output: `"17.0.15"` → 17, `"1.8.0_392"` → 8.
fn parse_java_major(text: &str) -> Option<u32> {
    let quoted = text.split('"').nth(1)?;
    let mut parts = quoted.split(['.', '_', '-', '+']);
    let first: u32 = parts.next()?.parse().ok()?;
    if first == 1 {
        parts.next()?.parse().ok()
    } else {
        Some(first)
    }
}

/// True when `lib/` holds a complete copy made from today's pom.
fn lib_is_complete(lib: &Path) -> bool {
    std::fs::read_to_string(lib.join(".complete")).is_ok_and(|pom| pom == POM)
}

/// Runs Maven to copy the broker's runtime dependencies into `<root>/lib` (replacing it).
fn fetch_jars(root: &Path) -> Result<(), HarnessError> {
    let mvn = which("mvn").ok_or_else(|| {
        HarnessError::KafkaUnavailable(format!(
            "Maven (`mvn`) is not on PATH: the harness fetches Apache Kafka {KAFKA_VERSION}'s \
             jars with it once (Debian/Ubuntu: apt-get install maven), or run against your own \
             cluster with --brokers"
        ))
    })?;
    let pom = root.join("pom.xml");
    write_if_changed(&pom, POM)?;
    let staging = root.join("lib.partial");
    let _ = std::fs::remove_dir_all(&staging);
    let log = root.join("maven.log");
    let log_file = std::fs::File::create(&log)
        .map_err(|e| HarnessError::io(format!("creating {}", log.display()), e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| HarnessError::io(format!("cloning {}", log.display()), e))?;
    eprintln!(
        "fetching Apache Kafka {KAFKA_VERSION}'s jars with Maven into {} (once; about a minute; \
         progress in {})",
        root.display(),
        log.display()
    );
    let started = Instant::now();
    let status = Command::new(&mvn)
        .current_dir(root)
        .args(["-B", "-f"])
        .arg(&pom)
        .arg(format!("-Dmaven.repo.local={}", root.join("m2").display()))
        .arg("dependency:copy-dependencies")
        .arg("-DincludeScope=runtime")
        .arg(format!("-DoutputDirectory={}", staging.display()))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .status()
        .map_err(|e| HarnessError::io(format!("running {}", mvn.display()), e))?;
    if !status.success() {
        return Err(HarnessError::KafkaInstall {
            root: root.to_path_buf(),
            status: status.to_string(),
            log_tail: crate::kafka::log_tail(&log, 30),
            log,
        });
    }
    std::fs::write(staging.join(".complete"), POM)
        .map_err(|e| HarnessError::io(format!("writing {}/.complete", staging.display()), e))?;
    let lib = root.join("lib");
    let _ = std::fs::remove_dir_all(&lib);
    std::fs::rename(&staging, &lib).map_err(|e| {
        HarnessError::io(
            format!("renaming {} to {}", staging.display(), lib.display()),
            e,
        )
    })?;
    eprintln!(
        "fetched Apache Kafka {KAFKA_VERSION}'s jars in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

/// The jars of `lib/`, sorted (a stable classpath), `:`-separated.
fn classpath(lib: &Path) -> Result<String, HarnessError> {
    let entries = std::fs::read_dir(lib)
        .map_err(|e| HarnessError::io(format!("listing {}", lib.display()), e))?;
    let mut jars: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jar"))
        .map(|path| path.display().to_string())
        .collect();
    jars.sort();
    if !jars.iter().any(|jar| jar.contains("kafka_2.13-")) {
        return Err(HarnessError::KafkaUnavailable(format!(
            "{} has no kafka_2.13 jar; delete it to fetch again",
            lib.display()
        )));
    }
    Ok(jars.join(":"))
}

/// Storage formatted for node `node_id` (made once under the install lock), to copy into a
/// node's data directory.
pub(crate) fn formatted_storage(
    installation: &Installation,
    node_id: u32,
) -> Result<PathBuf, HarnessError> {
    let dir = installation
        .root
        .join("formatted")
        .join(format!("node-{node_id}"));
    if dir.join("meta.properties").is_file() {
        return Ok(dir);
    }
    let _lock = InstallLock::acquire(&installation.root.join("install.lock"))?;
    if dir.join("meta.properties").is_file() {
        return Ok(dir);
    }
    let staging = installation
        .root
        .join("formatted")
        .join(format!("node-{node_id}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    create_dir(&staging)?;
    // Format only reads the roles, the node id, the quorum and the log dir; the ports are
    // placeholders that the formatted storage does not record.
    let config = staging.join("format.properties");
    let data = staging.join("data");
    let properties = format!(
        "process.roles=broker,controller\nnode.id={node_id}\n\
         controller.quorum.voters={node_id}@127.0.0.1:1\n\
         listeners=PLAINTEXT://127.0.0.1:2,CONTROLLER://127.0.0.1:1\n\
         controller.listener.names=CONTROLLER\nlog.dirs={}\n",
        data.display()
    );
    std::fs::write(&config, properties)
        .map_err(|e| HarnessError::io(format!("writing {}", config.display()), e))?;
    let output = Command::new(&installation.java)
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            installation.log4j_config.display()
        ))
        .args(["-cp", &installation.classpath, "kafka.tools.StorageTool"])
        .args(["format", "--cluster-id", CLUSTER_ID, "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io("running kafka.tools.StorageTool format", e))?;
    if !output.status.success() {
        return Err(HarnessError::KafkaUnavailable(format!(
            "formatting KRaft storage for node {node_id} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&data, &dir).map_err(|e| {
        HarnessError::io(
            format!("renaming {} to {}", data.display(), dir.display()),
            e,
        )
    })?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(dir)
}

/// Copies a directory tree (formatted storage: a few small files).
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<(), HarnessError> {
    create_dir(to)?;
    let entries = std::fs::read_dir(from)
        .map_err(|e| HarnessError::io(format!("listing {}", from.display()), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| HarnessError::io(format!("listing {}", from.display()), e))?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        if source.is_dir() {
            copy_tree(&source, &target)?;
        } else {
            std::fs::copy(&source, &target).map_err(|e| {
                HarnessError::io(
                    format!("copying {} to {}", source.display(), target.display()),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// The first `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn create_dir(dir: &Path) -> Result<(), HarnessError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))
}

fn write_if_changed(path: &Path, contents: &str) -> Result<(), HarnessError> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    std::fs::write(path, contents)
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}

/// An exclusive lock on a file, released when dropped.
struct InstallLock(std::fs::File);

impl InstallLock {
    fn acquire(path: &Path) -> Result<InstallLock, HarnessError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| HarnessError::io(format!("opening lock file {}", path.display()), e))?;
        fs4::FileExt::lock(&file)
            .map_err(|e| HarnessError::io(format!("locking {}", path.display()), e))?;
        Ok(InstallLock(file))
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = fs4::FileExt::unlock(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_major_versions() {
        let openjdk = "openjdk version \"17.0.15\" 2025-04-15\nOpenJDK Runtime Environment";
        assert_eq!(parse_java_major(openjdk), Some(17));
        assert_eq!(parse_java_major("java version \"1.8.0_392\""), Some(8));
        assert_eq!(
            parse_java_major("openjdk version \"21\" 2023-09-19"),
            Some(21)
        );
        assert_eq!(parse_java_major("openjdk version \"25-ea\""), Some(25));
        assert_eq!(parse_java_major("no version here"), None);
    }

    #[test]
    fn cluster_id_is_16_bytes_of_unpadded_base64url() {
        assert_eq!(CLUSTER_ID.len(), 22);
        assert!(CLUSTER_ID
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }
}
