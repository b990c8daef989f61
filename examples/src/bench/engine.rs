//! Running an exactly app inside the benchmark process: until its group has committed the
//! whole input, or until a partition is live again after a restart.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use exactly::{App, AppConfig, Metrics, MetricsSnapshot, Processor};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::progress::GroupOffsets;

/// An app running on a tokio task until [`RunningApp::stop`].
pub struct RunningApp {
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), exactly::Error>>,
    started: Instant,
    app_id: String,
}

impl RunningApp {
    /// Starts `processor` with `config`.
    pub fn start<P: Processor>(config: AppConfig, processor: P) -> anyhow::Result<Self> {
        let app_id = config.app_id().to_owned();
        let app = App::new(config, processor).with_context(|| format!("configuring {app_id}"))?;
        let metrics = app.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let started = Instant::now();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Ok(RunningApp {
            metrics,
            stop: Some(stop),
            task,
            started,
            app_id,
        })
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Its counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Fails if the app has stopped on its own (an error, or a panic).
    pub fn check_alive(&self) -> anyhow::Result<()> {
        if self.task.is_finished() {
            bail!("{} stopped before the benchmark was done", self.app_id);
        }
        Ok(())
    }

    /// Blocks until `condition` holds on the app's metrics (or fails after `limit`);
    /// returns the time since the app started.
    pub fn wait_for_metrics(
        &self,
        what: &str,
        limit: Duration,
        condition: impl Fn(&MetricsSnapshot) -> bool,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            if condition(&self.metrics()) {
                return Ok(self.started.elapsed());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!("{}: {what} did not happen within {limit:?}", self.app_id);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Shuts it down gracefully (commit, final full snapshot, leave the group) and returns its
    /// final counters.
    pub async fn stop(self) -> anyhow::Result<MetricsSnapshot> {
        self.stop_within(Duration::from_secs(120)).await
    }

    /// Like [`RunningApp::stop`], waiting up to `limit` (a final full snapshot of a large
    /// state takes a while).
    pub async fn stop_within(mut self, limit: Duration) -> anyhow::Result<MetricsSnapshot> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let outcome = tokio::time::timeout(limit, &mut self.task)
            .await
            .map_err(|_| anyhow!("{} did not shut down within {limit:?}", self.app_id))?
            .map_err(|e| anyhow!("{} panicked: {e}", self.app_id))?;
        outcome.with_context(|| format!("{} failed", self.app_id))?;
        Ok(self.metrics.snapshot())
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        // A benchmark that failed half-way must not leave an app consuming behind it.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One throughput run: how long the app took to commit all input records.
#[derive(Debug, Clone)]
pub struct ThroughputRun {
    /// From start (group join included) until the whole input was committed.
    pub elapsed: Duration,
    /// The app's counters at the end.
    pub metrics: MetricsSnapshot,
}

/// Runs `processor` with `config` (whose group is its app id) until its committed offsets on
/// `input` (with `partitions` partitions) add up to `records`, then stops it.
pub async fn run_to_end<P: Processor>(
    config: AppConfig,
    processor: P,
    bootstrap: &str,
    input: &str,
    partitions: i32,
    records: u64,
    limit: Duration,
) -> anyhow::Result<ThroughputRun> {
    let offsets = GroupOffsets::new(bootstrap, config.app_id(), input, partitions)?;
    let app = RunningApp::start(config, processor)?;
    let elapsed = blocking_with(&app, |app| {
        offsets.wait_for(records, app.started(), limit, || app.check_alive())
    })
    .await?;
    let metrics = app.stop().await?;
    Ok(ThroughputRun { elapsed, metrics })
}

/// Runs blocking `f` on `app` off the reactor's worker (the app's own tasks keep running).
pub async fn blocking_with<T>(app: &RunningApp, f: impl FnOnce(&RunningApp) -> T) -> T {
    tokio::task::block_in_place(|| f(app))
}
