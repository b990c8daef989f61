//! The benchmark's printed results: a table per case and the one-line summary.

use std::fmt::Write as _;
use std::time::Duration;

use super::footprint::Footprint;
use super::kstreams::KStreamsRestore;
use super::latency::LatencyRun;
use super::recovery::RestoreRun;
use super::scale::ScaleResults;

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
    /// The transactional pipe: exactly-once on this design without the framework.
    pub txn_pipe: Throughput,
    /// exactly passing records through, without state or decoding.
    pub exactly_pass_through: Throughput,
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
    /// State at scale: commit latency vs state size, warm vs cold restore, snapshot topic.
    pub scale: ScaleResults,
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

    /// exactly (default settings) ÷ the transactional pipe, records/s: what the framework
    /// (state, decoding, snapshots, checks) costs beyond the transactions.
    pub fn eos_vs_txn_pipe(&self) -> f64 {
        self.exactly_default.rate() / self.txn_pipe.rate()
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
    pub fn restore_vs_replay(&self) -> f64 {
        self.restore_replay.restore.as_secs_f64()
            / self.restore_snapshot.restore.as_secs_f64().max(1e-9)
    }

    /// The summary line, exactly in the form; `n/a` for what did not run.
    pub fn summary_line(&self) -> String {
        let or_na = |value: Option<f64>, decimals: usize| {
            value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
        };
        format!(
            "BENCH eos_vs_raw={:.2} eos_vs_kstreams={} eos_vs_quix={} restore_vs_replay={:.1} restore_vs_kstreams={} warm_vs_cold_restore={} e2e_p99_ms={} commit_p99_ratio_10m_vs_10k={} records={}",
            self.eos_vs_raw(),
            or_na(self.eos_vs_kstreams(), 2),
            or_na(self.eos_vs_quix(), 2),
            self.restore_vs_replay(),
            or_na(self.restore_vs_kstreams(), 1),
            or_na(self.scale.warm_vs_cold_restore(), 1),
            ms(self.latency.p99),
            or_na(self.scale.commit_p99_ratio_10m_vs_10k().map(|(r, _)| r), 2),
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
        row(&mut t, &self.txn_pipe.case, &self.txn_pipe);
        row(
            &mut t,
            &self.exactly_pass_through.case,
            &self.exactly_pass_through,
        );
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
        let _ = writeln!(
            t,
            "  exactly (default) vs the transactional pipe: {:.2}x",
            self.eos_vs_txn_pipe()
        );
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
        t.push_str(&self.latency.hop_table());
        let _ = writeln!(t);
        t.push_str(&self.scale.table());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::scale::{CommitRow, SnapshotTopicSize, Variant, WarmCold};

    fn tp(case: &str, records: u64, seconds: u64) -> Throughput {
        Throughput {
            case: case.into(),
            records,
            elapsed: Duration::from_secs(seconds),
        }
    }

    fn restore(ms: u64) -> RestoreRun {
        RestoreRun {
            build: Duration::from_secs(1),
            restore: Duration::from_millis(ms),
            live_after_start: Duration::from_millis(ms + 100),
            replayed: 0,
            snapshot_bytes: 1_000,
            snapshot_write: Duration::from_millis(5),
        }
    }

    fn commit_row(variant: Variant, keys: u64, p99_ms: u64) -> CommitRow {
        CommitRow {
            variant,
            keys,
            updates: 20_000,
            commits: 200,
            p50: Duration::from_millis(p99_ms / 2),
            p99: Duration::from_millis(p99_ms),
            max: Duration::from_millis(p99_ms),
            fill: Duration::from_secs(3),
            fill_stop: Duration::from_secs(1),
            snapshot_bytes: 1_000,
            restore: Duration::from_millis(50),
            restored_from_full_snapshot: variant == Variant::Plain,
            update_elapsed: Duration::from_secs(4),
            load: None,
        }
    }

    /// exactly at 100k records/s, raw at 200k, Quix at 25k, Kafka Streams at 40k and 50k;
    /// restores 0.5 s (snapshot), 4 s (replay), 2 s (Kafka Streams); warm 0.25 s, cold 5 s;
    /// p99 ratios 3 (plain) and 1.5 (store).
    fn results() -> Results {
        Results {
            records: 1_000_000,
            partitions: 8,
            raw: tp("raw", 1_000_000, 5),
            txn_pipe: tp("transactional pipe", 1_000_000, 8),
            exactly_pass_through: tp("exactly pass-through", 1_000_000, 9),
            exactly_default: tp("exactly", 1_000_000, 10),
            exactly_intervals: vec![],
            quix: QuixResult::Measured(tp("quix", 1_000_000, 40)),
            kstreams: Ok(vec![tp("ks 1", 1_000_000, 25), tp("ks 8", 1_000_000, 20)]),
            kstreams_restore: Ok(KStreamsRestore {
                restore: Duration::from_secs(2),
                ready_after_start: Duration::from_secs(3),
                records: 1_000_000,
            }),
            restore_snapshot: restore(500),
            restore_replay: restore(4_000),
            state_keys: 1_000_000,
            latency: LatencyRun {
                commands: 30_000,
                samples: 29_000,
                p50: Duration::from_millis(300),
                p99: Duration::from_millis(1_128),
                max: Duration::from_millis(1_500),
                hops: Vec::new(),
                services: Vec::new(),
                second_half_p99: None,
                slow_seconds: Vec::new(),
                warm_up: None,
            },
            latency_rate: 1_000,
            scale: ScaleResults {
                updates: 20_000,
                rows: vec![
                    commit_row(Variant::Plain, 10_000, 10),
                    commit_row(Variant::Store, 10_000, 10),
                    commit_row(Variant::Plain, 10_000_000, 30),
                    commit_row(Variant::Store, 10_000_000, 15),
                ],
                warm_cold: Some(WarmCold {
                    keys: 10_000_000,
                    warm: Duration::from_millis(250),
                    warm_replayed: 0,
                    cold: Duration::from_secs(5),
                    cold_replayed: 1_000,
                }),
                snapshot_topic: SnapshotTopicSize {
                    keys: 10_000,
                    full_snapshots: 110,
                    trims: 100,
                    records: 5,
                    bytes: 300,
                    full_snapshot_bytes: 200,
                },
            },
            footprints: vec![],
        }
    }

    #[test]
    fn the_summary_line_has_every_field_in_order() {
        assert_eq!(
            results().summary_line(),
            "BENCH eos_vs_raw=0.50 eos_vs_kstreams=2.00 eos_vs_quix=4.00 restore_vs_replay=8.0 restore_vs_kstreams=4.0 warm_vs_cold_restore=20.0 e2e_p99_ms=1128 commit_p99_ratio_10m_vs_10k=3.00 records=1000000"
        );
    }

    #[test]
    fn peers_that_did_not_run_are_not_a_number() {
        let mut r = results();
        r.quix = QuixResult::Unavailable("skipped".into());
        r.kstreams = Err("no JDK".into());
        r.kstreams_restore = Err("no JDK".into());
        r.scale.warm_cold = None;
        r.scale.rows.retain(|row| row.keys != 10_000_000);
        assert_eq!(
            r.summary_line(),
            "BENCH eos_vs_raw=0.50 eos_vs_kstreams=n/a eos_vs_quix=n/a restore_vs_replay=8.0 restore_vs_kstreams=n/a warm_vs_cold_restore=n/a e2e_p99_ms=1128 commit_p99_ratio_10m_vs_10k=n/a records=1000000"
        );
        let tables = r.tables();
        assert!(tables.contains("not measured: no JDK"), "{tables}");
    }

    #[test]
    fn kafka_streams_is_compared_with_its_faster_run() {
        let r = results();
        assert_eq!(r.kstreams_best().map(|t| t.case.as_str()), Some("ks 8"));
        let tables = r.tables();
        assert!(
            tables.contains("vs the faster Kafka Streams run: 2.00x"),
            "{tables}"
        );
        assert!(tables.contains("State at scale"), "{tables}");
    }

    #[test]
    fn the_transactional_pipe_has_a_row_and_is_compared_with_exactly() {
        let tables = results().tables();
        // 1M records in 8 s against the raw pipe's 5 s; exactly took 10 s.
        let row = tables
            .lines()
            .find(|l| l.contains("transactional pipe") && !l.contains(" vs "))
            .unwrap_or_else(|| panic!("no transactional pipe row in\n{tables}"));
        assert!(row.trim_end().ends_with("0.62"), "{row}");
        assert!(
            tables.contains("exactly (default) vs the transactional pipe: 0.80x"),
            "{tables}"
        );
    }
}
