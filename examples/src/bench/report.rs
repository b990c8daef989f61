//! The benchmark's printed results: a table per case and the one-line summary.

use std::fmt::Write as _;
use std::time::Duration;

use super::footprint::Footprint;
use super::kstreams::KStreamsRestore;
use super::latency::LatencyRun;
use super::recovery::RestoreRun;

/// One throughput measurement.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// What ran.
    pub case: String,
    /// Records processed.
    pub records: u64,
    /// Wall time (start-up included).
    pub elapsed: Duration,
}

impl Throughput {
    /// Records per second.
    pub fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Quix's outcome: a measurement, or why there is none.
#[derive(Debug, Clone)]
pub enum QuixResult {
    /// It ran.
    Measured(Throughput),
    /// It could not run; the reason, as shown to the user.
    Unavailable(String),
}

/// Everything one benchmark run measured.
#[derive(Debug, Clone)]
pub struct Results {
    /// Input records per throughput case.
    pub records: u64,
    /// Partitions of the throughput topics.
    pub partitions: i32,
    /// The raw pipe.
    pub raw: Throughput,
    /// exactly at its default settings.
    pub exactly_default: Throughput,
    /// exactly at other commit intervals.
    pub exactly_intervals: Vec<Throughput>,
    /// Quix Streams.
    pub quix: QuixResult,
    /// Kafka Streams with one thread and with one per partition, or why it did not run.
    pub kstreams: Result<Vec<Throughput>, String>,
    /// Kafka Streams restoring the restore case's state from its changelog.
    pub kstreams_restore: Result<KStreamsRestore, String>,
    /// Restore with full snapshots.
    pub restore_snapshot: RestoreRun,
    /// Restore by replaying the whole partition.
    pub restore_replay: RestoreRun,
    /// Keys (= records) in the restored state.
    pub state_keys: u64,
    /// The chain's latency.
    pub latency: LatencyRun,
    /// The chain's input rate, commands per second.
    pub latency_rate: u64,
    /// Threads and memory per assigned partition count.
    pub footprints: Vec<Footprint>,
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

impl Results {
    /// exactly (default settings) ÷ raw pipe, records/s.
    pub fn eos_vs_raw(&self) -> f64 {
        self.exactly_default.rate() / self.raw.rate()
    }

    /// exactly (default settings) ÷ Quix, records/s; `None` when Quix did not run.
    pub fn eos_vs_quix(&self) -> Option<f64> {
        match &self.quix {
            QuixResult::Measured(quix) => Some(self.exactly_default.rate() / quix.rate()),
            QuixResult::Unavailable(_) => None,
        }
    }

    /// The faster Kafka Streams run.
    pub fn kstreams_best(&self) -> Option<&Throughput> {
        let runs = self.kstreams.as_ref().ok()?;
        runs.iter().max_by(|a, b| a.rate().total_cmp(&b.rate()))
    }

    /// exactly (default settings) ÷ the faster Kafka Streams run, records/s; `None` when Kafka
    /// Streams did not run.
    pub fn eos_vs_kstreams(&self) -> Option<f64> {
        self.kstreams_best()
            .map(|best| self.exactly_default.rate() / best.rate())
    }

    /// Kafka Streams' restore from its changelog ÷ exactly's restore from its full snapshot;
    /// `None` when Kafka Streams did not run.
    pub fn restore_vs_kstreams(&self) -> Option<f64> {
        let kstreams = self.kstreams_restore.as_ref().ok()?;
        Some(kstreams.restore.as_secs_f64() / self.restore_snapshot.restore.as_secs_f64().max(1e-9))
    }

    /// Replay restore time ÷ snapshot restore time.
    pub fn restore_speedup(&self) -> f64 {
        self.restore_replay.restore.as_secs_f64()
            / self.restore_snapshot.restore.as_secs_f64().max(1e-9)
    }

    /// The summary line, exactly in the form.
    pub fn summary_line(&self) -> String {
        let quix = self
            .eos_vs_quix()
            .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}"));
        format!(
            "BENCH eos_vs_raw={:.2} eos_vs_quix={quix} restore_speedup={:.1} e2e_p99_ms={} records={}",
            self.eos_vs_raw(),
            self.restore_speedup(),
            ms(self.latency.p99),
            self.records
        )
    }

    /// The human-readable tables.
    pub fn tables(&self) -> String {
        let mut t = String::new();
        let raw = self.raw.rate();
        let _ = writeln!(
            t,
            "Throughput: {} records of ~100 B, {} partitions (start-up included)",
            self.records, self.partitions
        );
        let _ = writeln!(
            t,
            "  {:<46} {:>9} {:>11} {:>7}",
            "case", "seconds", "records/s", "vs raw"
        );
        let row = |t: &mut String, case: &str, tp: &Throughput| {
            let _ = writeln!(
                t,
                "  {:<46} {:>9.2} {:>11.0} {:>7.2}",
                case,
                tp.elapsed.as_secs_f64(),
                tp.rate(),
                tp.rate() / raw
            );
        };
        row(&mut t, &self.raw.case, &self.raw);
        row(&mut t, &self.exactly_default.case, &self.exactly_default);
        for tp in &self.exactly_intervals {
            row(&mut t, &tp.case, tp);
        }
        match &self.quix {
            QuixResult::Measured(quix) => row(&mut t, &quix.case, quix),
            QuixResult::Unavailable(why) => {
                let _ = writeln!(
                    t,
                    "  {:<46} not measured: {why}",
                    "Quix Streams 3.28.1, exactly-once"
                );
            }
        }
        match &self.kstreams {
            Ok(runs) => {
                for tp in runs {
                    row(&mut t, &tp.case, tp);
                }
            }
            Err(why) => {
                let _ = writeln!(t, "  {:<46} not measured: {why}", "Kafka Streams 4.4.0");
            }
        }
        if let Some(ratio) = self.eos_vs_kstreams() {
            let _ = writeln!(
                t,
                "  exactly (default) vs the faster Kafka Streams run: {ratio:.2}x"
            );
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "Restore of one partition with {} keys ({} input records)",
            self.state_keys, self.state_keys
        );
        let _ = writeln!(
            t,
            "  {:<34} {:>11} {:>9} {:>14} {:>11} {:>12}",
            "mode", "restore ms", "replayed", "live after ms", "snapshot B", "write ms"
        );
        for (mode, run) in [
            ("full snapshot + replay of the tail", &self.restore_snapshot),
            ("no full snapshots (replay all)", &self.restore_replay),
        ] {
            let _ = writeln!(
                t,
                "  {:<34} {:>11} {:>9} {:>14} {:>11} {:>12}",
                mode,
                ms(run.restore),
                run.replayed,
                ms(run.live_after_start),
                run.snapshot_bytes,
                ms(run.snapshot_write)
            );
        }
        match &self.kstreams_restore {
            Ok(k) => {
                let _ = writeln!(
                    t,
                    "  {:<34} {:>11} {:>9} {:>14}",
                    "Kafka Streams, from its changelog",
                    ms(k.restore),
                    k.records,
                    ms(k.ready_after_start)
                );
                if let Some(ratio) = self.restore_vs_kstreams() {
                    let _ = writeln!(
                        t,
                        "  Kafka Streams restore time / exactly's (full snapshot): {ratio:.1}x"
                    );
                }
            }
            Err(why) => {
                let _ = writeln!(t, "  {:<34} not measured: {why}", "Kafka Streams");
            }
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "End-to-end latency A -> B -> C at {} commands/s ({} commands, {} summaries sampled): p50 {} ms, p99 {} ms, max {} ms",
            self.latency_rate,
            self.latency.commands,
            self.latency.samples,
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.max)
        );
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "Partition scaling (one process, counting app, the same {} records at each count)",
            self.records
        );
        let _ = writeln!(
            t,
            "  {:>10} {:>10} {:>15} {:>8} {:>9}",
            "partitions", "records/s", "first record ms", "threads", "RSS MiB"
        );
        for f in &self.footprints {
            let _ = writeln!(
                t,
                "  {:>10} {:>10.0} {:>15} {:>8} {:>9.1}",
                f.partitions,
                f.records_per_s,
                f.first_record_ms,
                f.threads,
                f.rss_kib as f64 / 1024.0
            );
        }
        if let (Some(first), Some(last)) = (self.footprints.first(), self.footprints.last()) {
            let extra = (last.partitions - first.partitions).max(1) as f64;
            let _ = writeln!(
                t,
                "  each partition beyond the first: {:.1} threads, {:.2} MiB",
                (last.threads as f64 - first.threads as f64) / extra,
                (last.rss_kib as f64 - first.rss_kib as f64) / 1024.0 / extra
            );
        }
        t
    }
}
