//! Finding (and building) the service binaries a chaos run starts.
//!
//! They belong to the package `exactly-examples`, which depends on this crate, so this crate
//! cannot link them: it runs them as executables from the same target directory and profile
//! as the running chaos executable (`target/release/chaos` → `target/release/ledger`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The executables of `exactly-examples` a chaos run needs.
pub const REQUIRED: [&str; 4] = ["validate", "ledger", "stats", "chaos-workload"];

/// Errors while locating or building the binaries.
#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    /// The running executable's directory is unknown.
    #[error("cannot locate the chaos executable: {0}")]
    CurrentExe(std::io::Error),
    /// The build failed or could not start.
    #[error("building the service binaries with `{command}` failed: {reason}")]
    Build {
        /// The command line.
        command: String,
        /// Exit status or spawn error.
        reason: String,
    },
    /// A binary is still missing.
    #[error(
        "service binary {} is missing; build it with `cargo build {}-p exactly-examples --bins` \
         (or run the chaos suite through `cargo run`, which builds it)",
        path.display(),
        profile_flag
    )]
    Missing {
        /// Where it was expected.
        path: PathBuf,
        /// `--release ` or empty.
        profile_flag: String,
    },
}

/// Where the service binaries are and which cargo profile built them.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// The directory of the running executable (for a test binary in `deps/`, its parent).
    pub fn beside_current_exe() -> Result<Binaries, BinariesError> {
        let exe = std::env::current_exe().map_err(BinariesError::CurrentExe)?;
        let mut dir = exe
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(parent) = dir.parent() {
                dir = parent.to_path_buf();
            }
        }
        Ok(Binaries { dir })
    }

    /// The path of executable `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The cargo profile flags matching the directory (`target/release` → `--release`,
    /// `target/debug` → none, `target/<p>` → `--profile <p>`).
    fn profile_args(&self) -> Vec<String> {
        match self.dir.file_name().and_then(|n| n.to_str()) {
            Some("release") => vec!["--release".into()],
            Some("debug") | None => Vec::new(),
            Some(other) => vec!["--profile".into(), other.into()],
        }
    }

    /// Runs `$CARGO build [profile] -p exactly-examples --bins`, so the binaries are never
    /// stale. Without `CARGO` (the chaos binary run directly, not through cargo) it only checks
    /// they exist.
    pub fn build_if_possible(&self) -> Result<(), BinariesError> {
        if let Some(cargo) = std::env::var_os("CARGO").filter(|c| !c.is_empty()) {
            let mut args: Vec<String> = vec!["build".into(), "--quiet".into()];
            args.extend(self.profile_args());
            args.extend(["-p".into(), "exactly-examples".into(), "--bins".into()]);
            let command = format!("{} {}", cargo.to_string_lossy(), args.join(" "));
            eprintln!("chaos: building the service binaries: {command}");
            let mut cmd = Command::new(&cargo);
            cmd.args(&args);
            // Build into the target directory the running executable came from.
            if let Some(target) = self.dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            let status = cmd.status().map_err(|e| BinariesError::Build {
                command: command.clone(),
                reason: e.to_string(),
            })?;
            if !status.success() {
                return Err(BinariesError::Build {
                    command,
                    reason: status.to_string(),
                });
            }
        }
        self.check()
    }

    /// Fails with [`BinariesError::Missing`] naming the first missing binary.
    pub fn check(&self) -> Result<(), BinariesError> {
        for name in REQUIRED {
            let path = self.path(name);
            if !path.is_file() {
                return Err(BinariesError::Missing {
                    path,
                    profile_flag: self
                        .profile_args()
                        .iter()
                        .map(|a| format!("{a} "))
                        .collect(),
                });
            }
        }
        Ok(())
    }
}
