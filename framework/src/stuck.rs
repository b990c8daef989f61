//! Stuck input detection: a read_committed consumer sees nothing past an input partition's last
//! stable offset (LSO), so a transaction that a producer upstream left open stops the partition
//! without any error — the "hanging transaction" Kafka needed KIP-664 tooling for. A thread per
//! app compares each assigned partition's LSO with its high watermark; when the LSO stays put
//! below it for longer than [`AppConfig::stuck_input_after`], it logs a warning naming the
//! partition, the stuck offset, how long, and the commands that resolve it, and counts the
//! partition in [`MetricsSnapshot::stuck_input_partitions`](crate::MetricsSnapshot).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::AppConfig;
use crate::error::Error;
use crate::metrics::Metrics;

/// How long one watermark query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// An assigned input partition.
type Key = (String, i32);

/// The partitions to watch, shared with the runtime, which adds and removes them as they are
/// assigned and revoked.
#[derive(Default)]
pub(crate) struct Watched(Mutex<BTreeSet<Key>>);

impl Watched {
    pub(crate) fn add(&self, topic: &str, partition: i32) {
        self.lock().insert((topic.to_owned(), partition));
    }

    pub(crate) fn remove(&self, topic: &str, partition: i32) {
        self.lock().remove(&(topic.to_owned(), partition));
    }

    fn list(&self) -> Vec<Key> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Key>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Since when a partition's LSO has stood at `offset` below the high watermark.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stall {
    offset: i64,
    since: Instant,
    reported: bool,
}

/// What the watch knows of each partition between two looks.
#[derive(Default)]
struct Stalls(BTreeMap<Key, Stall>);

/// What a look at one partition found.
#[derive(Debug, PartialEq)]
enum Verdict {
    Moving,
    Stalled,
    /// Stuck for longer than the limit: report it (once per stall).
    NewlyStuck {
        offset: i64,
        stuck_for: Duration,
    },
    StillStuck,
    /// Was reported stuck, moves again.
    Released {
        offset: i64,
        stuck_for: Duration,
    },
}

impl Stalls {
    /// Records one look at `key`: its LSO and high watermark at `now`.
    fn look(&mut self, key: &Key, lso: i64, high: i64, now: Instant, limit: Duration) -> Verdict {
        if lso >= high {
            return self.release(key, now);
        }
        match self.0.get_mut(key) {
            Some(stall) if stall.offset == lso => {
                let stuck_for = now.saturating_duration_since(stall.since);
                if stall.reported {
                    Verdict::StillStuck
                } else if stuck_for >= limit {
                    stall.reported = true;
                    Verdict::NewlyStuck {
                        offset: lso,
                        stuck_for,
                    }
                } else {
                    Verdict::Stalled
                }
            }
            _ => {
                let released = self.release(key, now);
                self.0.insert(
                    key.clone(),
                    Stall {
                        offset: lso,
                        since: now,
                        reported: false,
                    },
                );
                match released {
                    Verdict::Released { .. } => released,
                    _ => Verdict::Stalled,
                }
            }
        }
    }

    fn release(&mut self, key: &Key, now: Instant) -> Verdict {
        match self.0.remove(key) {
            Some(stall) if stall.reported => Verdict::Released {
                offset: stall.offset,
                stuck_for: now.saturating_duration_since(stall.since),
            },
            _ => Verdict::Moving,
        }
    }

    fn forget_all_but(&mut self, keys: &[Key]) {
        self.0.retain(|key, _| keys.contains(key));
    }

    fn reported(&self) -> u64 {
        self.0.values().filter(|s| s.reported).count() as u64
    }
}

/// Starts the watch thread; it ends when the app stops (`watched` is dropped by everyone else).
pub(crate) fn start(
    config: &AppConfig,
    watched: Arc<Watched>,
    metrics: Metrics,
) -> Result<(), Error> {
    let limit = config.stuck_input_after;
    let committed: BaseConsumer = config
        .consumer_config(false)
        .create()
        .map_err(|source| Error::kafka("creating the stuck-input watch", source))?;
    let mut uncommitted_config = config.consumer_config(false);
    uncommitted_config.set("isolation.level", "read_uncommitted");
    let uncommitted: BaseConsumer = uncommitted_config
        .create()
        .map_err(|source| Error::kafka("creating the stuck-input watch", source))?;
    let bootstrap = config.bootstrap_servers.clone();
    std::thread::Builder::new()
        .name("exactly-stuck".into())
        .spawn(move || {
            let every = (limit / 3).clamp(Duration::from_secs(1), Duration::from_secs(30));
            let mut stalls = Stalls::default();
            // Alive as long as the runtime holds its handle.
            while Arc::strong_count(&watched) > 1 {
                let keys = watched.list();
                stalls.forget_all_but(&keys);
                for key in &keys {
                    let Some((lso, high)) = ends(&committed, &uncommitted, key) else {
                        continue;
                    };
                    let verdict = stalls.look(key, lso, high, Instant::now(), limit);
                    report(key, high, &verdict, &bootstrap);
                }
                metrics.stuck_input_partitions(stalls.reported());
                sleep_while_watched(&watched, every);
            }
        })
        .map_err(|source| Error::Io {
            context: "starting the stuck-input watch".into(),
            source,
        })?;
    Ok(())
}

/// The partition's last stable offset and high watermark, or None when either query failed
/// (logged at debug level: the next look tries again).
fn ends(committed: &BaseConsumer, uncommitted: &BaseConsumer, key: &Key) -> Option<(i64, i64)> {
    let (topic, partition) = (key.0.as_str(), key.1);
    let query = |client: &BaseConsumer| {
        client
            .fetch_watermarks(topic, partition, QUERY_TIMEOUT)
            .map(|(_, end)| end)
            .map_err(|error| tracing::debug!(topic, partition, %error, "watermark query failed"))
            .ok()
    };
    Some((query(committed)?, query(uncommitted)?))
}

fn report(key: &Key, high: i64, verdict: &Verdict, bootstrap: &str) {
    let (topic, partition) = (key.0.as_str(), key.1);
    match *verdict {
        Verdict::NewlyStuck { offset, stuck_for } => tracing::warn!(
            topic,
            partition,
            stuck_offset = offset,
            high_watermark = high,
            stuck_for_s = stuck_for.as_secs(),
            "input partition stuck: a transaction left open upstream holds back every record from the stuck offset on (read_committed); find it with `kafka-transactions.sh --bootstrap-server {bootstrap} find-hanging --topic {topic} --partition {partition}` (or `describe-producers`), and abort it with `kafka-transactions.sh --bootstrap-server {bootstrap} abort --topic {topic} --partition {partition} --start-offset {offset}` once its producer is known to be gone"
        ),
        Verdict::Released { offset, stuck_for } => tracing::info!(
            topic,
            partition,
            stuck_offset = offset,
            stuck_for_s = stuck_for.as_secs(),
            "input partition moves again"
        ),
        Verdict::Moving | Verdict::Stalled | Verdict::StillStuck => {}
    }
}

fn sleep_while_watched(watched: &Arc<Watched>, every: Duration) {
    let until = Instant::now() + every;
    while Instant::now() < until && Arc::strong_count(watched) > 1 {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);

    fn key() -> Key {
        ("in".to_owned(), 3)
    }

    #[test]
    fn an_lso_below_the_high_watermark_for_longer_than_the_limit_is_stuck() {
        let mut stalls = Stalls::default();
        let t0 = Instant::now();
        assert_eq!(stalls.look(&key(), 40, 45, t0, LIMIT), Verdict::Stalled);
        assert_eq!(
            stalls.look(&key(), 40, 50, t0 + Duration::from_secs(59), LIMIT),
            Verdict::Stalled
        );
        assert_eq!(
            stalls.look(&key(), 40, 50, t0 + LIMIT, LIMIT),
            Verdict::NewlyStuck {
                offset: 40,
                stuck_for: LIMIT
            }
        );
        assert_eq!(stalls.reported(), 1);
        // Reported once per stall.
        assert_eq!(
            stalls.look(&key(), 40, 55, t0 + LIMIT * 2, LIMIT),
            Verdict::StillStuck
        );
        // The transaction ended: the LSO caught up.
        assert_eq!(
            stalls.look(&key(), 55, 55, t0 + LIMIT * 3, LIMIT),
            Verdict::Released {
                offset: 40,
                stuck_for: LIMIT * 3
            }
        );
        assert_eq!(stalls.reported(), 0);
    }

    #[test]
    fn an_lso_that_moves_is_never_stuck() {
        let mut stalls = Stalls::default();
        let t0 = Instant::now();
        // Always some transaction open, but never the same one for long.
        for i in 0..10u32 {
            let at = t0 + Duration::from_secs(30) * i;
            let lso = i64::from(i) * 10;
            assert_eq!(
                stalls.look(&key(), lso, lso + 5, at, LIMIT),
                Verdict::Stalled
            );
        }
        assert_eq!(stalls.reported(), 0);
        assert_eq!(
            stalls.look(&key(), 100, 100, t0 + LIMIT * 10, LIMIT),
            Verdict::Moving
        );
    }

    #[test]
    fn a_stuck_partition_that_moves_to_another_stall_is_released_first() {
        let mut stalls = Stalls::default();
        let t0 = Instant::now();
        stalls.look(&key(), 40, 45, t0, LIMIT);
        stalls.look(&key(), 40, 45, t0 + LIMIT, LIMIT);
        assert!(matches!(
            stalls.look(&key(), 45, 60, t0 + LIMIT * 2, LIMIT),
            Verdict::Released { offset: 40, .. }
        ));
        assert_eq!(stalls.reported(), 0);
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut stalls = Stalls::default();
        let t0 = Instant::now();
        stalls.look(&key(), 40, 45, t0, LIMIT);
        stalls.look(&key(), 40, 45, t0 + LIMIT, LIMIT);
        stalls.forget_all_but(&[]);
        assert_eq!(stalls.reported(), 0);
    }
}
