//! What a rebalance did to each partition, read from the services' logs: which partitions
//! changed owner, which kept their owner but were stopped anyway (revoked, re-assigned,
//! recovered), and how many transactions the untouched partitions committed while the group
//! rebalanced. The `rebalance-check` binary reports it.
//!
//! It reads the framework's own log lines (`exactly::runtime` at info, `exactly::partition` at
//! debug): `partitions assigned; ...`, `partitions revoked; ...` (with a `partitions=` list of
//! `topic/p`), `going live` and `transaction committed` (with the worker span's `partition=`).

use std::collections::{BTreeMap, BTreeSet};

/// One thing an instance logged about a partition.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The partition was assigned to the instance (its worker starts).
    Assigned,
    /// The partition was revoked from the instance (its worker stops).
    Revoked,
    /// The worker recovered and went live.
    Live,
    /// The worker committed a transaction.
    Committed,
}

/// An event of one instance, at a time in seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    /// Seconds since the Unix epoch.
    pub at: f64,
    /// The instance whose log it is.
    pub instance: String,
    /// The partition.
    pub partition: i32,
    /// What happened.
    pub event: Event,
}

/// The events in one instance's log about `topic`.
pub fn parse_log(instance: &str, topic: &str, text: &str) -> Vec<Logged> {
    let mut events = Vec::new();
    for line in text.lines() {
        let Some(at) = line.split_whitespace().next().and_then(parse_timestamp) else {
            continue;
        };
        let mut push = |partition: i32, event: Event| {
            events.push(Logged {
                at,
                instance: instance.to_owned(),
                partition,
                event,
            })
        };
        let listed = |event: Event, push: &mut dyn FnMut(i32, Event)| {
            for partition in listed_partitions(line, topic) {
                push(partition, event.clone());
            }
        };
        if line.contains("partitions assigned; starting their workers") {
            listed(Event::Assigned, &mut push);
        } else if line.contains("partitions revoked; stopping their workers") {
            listed(Event::Revoked, &mut push);
        } else if let Some(partition) = worker_partition(line, topic) {
            if line.contains(": going live") {
                push(partition, Event::Live);
            } else if line.contains(": transaction committed") {
                push(partition, Event::Committed);
            }
        }
    }
    events
}

/// The partitions of `topic` in a `partitions=t/0,t/3` field.
fn listed_partitions(line: &str, topic: &str) -> Vec<i32> {
    let Some(list) = line.split("partitions=").nth(1) else {
        return Vec::new();
    };
    let list = list.split_whitespace().next().unwrap_or("");
    list.split(',')
        .filter_map(|entry| entry.rsplit_once('/'))
        .filter(|(t, _)| *t == topic)
        .filter_map(|(_, p)| p.parse().ok())
        .collect()
}

/// The partition of a `partition_worker{topic=T partition=P ...}` span on `topic`.
fn worker_partition(line: &str, topic: &str) -> Option<i32> {
    let span = line.split("partition_worker{").nth(1)?;
    let span = span.split('}').next()?;
    let mut fields = span.split_whitespace();
    let span_topic = fields.next()?.strip_prefix("topic=")?;
    if span_topic != topic {
        return None;
    }
    fields.next()?.strip_prefix("partition=")?.parse().ok()
}

/// `2026-11-28T07:26:37.770614Z` → seconds since the Unix epoch.
pub fn parse_timestamp(text: &str) -> Option<f64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut ymd = date.split('-').map(|n| n.parse::<i64>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.split(':');
    let (hours, minutes) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let seconds: f64 = hms.next()?.parse().ok()?;
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hours * 3_600 + minutes * 60) as f64 + seconds)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// What one rebalance did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebalanceOutcome {
    /// Partitions whose owner changed.
    pub moved: BTreeSet<i32>,
    /// Partitions that kept their owner but were revoked, assigned again or recovered anyway.
    pub unmoved_stopped: BTreeSet<i32>,
    /// Transactions committed by the other partitions during the rebalance.
    pub commits_during: u64,
    /// When it started (the trigger) and ended (the last moved partition live again).
    pub window: (f64, f64),
}

/// The owner of every partition at time `at` (from assignments and revocations before it).
pub fn owners_at(events: &[Logged], at: f64) -> BTreeMap<i32, String> {
    let mut events: Vec<&Logged> = events.iter().filter(|e| e.at <= at).collect();
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut owners = BTreeMap::new();
    for event in events {
        match event.event {
            Event::Assigned => {
                owners.insert(event.partition, event.instance.clone());
            }
            Event::Revoked => {
                if owners.get(&event.partition) == Some(&event.instance) {
                    owners.remove(&event.partition);
                }
            }
            Event::Live | Event::Committed => {}
        }
    }
    owners
}

/// What the rebalance triggered at `trigger` did, judged at `settled` (when every partition
/// was live again under its new owner).
pub fn analyse(events: &[Logged], trigger: f64, settled: f64) -> RebalanceOutcome {
    let mut events: Vec<Logged> = events.to_vec();
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    let before = owners_at(&events, trigger);
    let after = owners_at(&events, settled);
    let partitions: BTreeSet<i32> = before.keys().chain(after.keys()).copied().collect();
    let in_window = |e: &&Logged| e.at >= trigger && e.at <= settled;
    let mut outcome = RebalanceOutcome {
        window: (trigger, settled),
        ..RebalanceOutcome::default()
    };
    for partition in partitions {
        if before.get(&partition) != after.get(&partition) {
            outcome.moved.insert(partition);
            continue;
        }
        // Revoked and assigned again, or recovered (going live again after an abort, e.g.
        // offsets sent with a stale generation): stopped, although it kept its owner.
        let touched = events.iter().filter(in_window).any(|e| {
            e.partition == partition
                && matches!(e.event, Event::Assigned | Event::Revoked | Event::Live)
        });
        if touched {
            outcome.unmoved_stopped.insert(partition);
        }
    }
    outcome.commits_during = events
        .iter()
        .filter(in_window)
        .filter(|e| e.event == Event::Committed)
        .filter(|e| {
            !outcome.moved.contains(&e.partition) && !outcome.unmoved_stopped.contains(&e.partition)
        })
        .count() as u64;
    outcome
}

/// The moment the group settled: every partition of `0..partitions` has an owner whose
/// latest assignment was followed by going live (the latest of those, and not before `since`).
/// `None` while some partition is unowned or still recovering.
pub fn settled_at(events: &[Logged], partitions: i32, since: f64) -> Option<f64> {
    let mut events: Vec<Logged> = events.to_vec();
    events.sort_by(|a, b| a.at.total_cmp(&b.at));
    let last = events.last()?.at.max(since);
    let owners = owners_at(&events, last);
    let mut settled = since;
    for partition in 0..partitions {
        let owner = owners.get(&partition)?;
        let assigned = events
            .iter()
            .filter(|e| e.partition == partition && &e.instance == owner)
            .filter(|e| e.event == Event::Assigned)
            .map(|e| e.at)
            .fold(f64::MIN, f64::max);
        let live = events
            .iter()
            .filter(|e| e.partition == partition && &e.instance == owner)
            .filter(|e| e.event == Event::Live && e.at >= assigned)
            .map(|e| e.at)
            .fold(f64::MIN, f64::max);
        if live < assigned {
            return None;
        }
        settled = settled.max(live);
    }
    Some(settled)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG_A: &str = "\
2026-11-28T07:00:00.000000Z  INFO exactly::runtime: partitions assigned; starting their workers partitions=in/0,in/1,other/0
2026-11-28T07:00:01.000000Z DEBUG partition_worker{topic=in partition=0 transactional_id=app.in.0}: exactly::partition: going live next_offset=0 epoch=1
2026-11-28T07:00:01.500000Z DEBUG partition_worker{topic=in partition=1 transactional_id=app.in.1}: exactly::partition: going live next_offset=0 epoch=1
2026-11-28T07:00:02.000000Z DEBUG partition_worker{topic=in partition=0 transactional_id=app.in.0}: exactly::partition: transaction committed next_offset=5
2026-11-28T07:00:10.000000Z  INFO exactly::runtime: partitions revoked; stopping their workers partitions=in/1
2026-11-28T07:00:11.000000Z DEBUG partition_worker{topic=in partition=0 transactional_id=app.in.0}: exactly::partition: transaction committed next_offset=9
";

    const LOG_B: &str = "\
2026-11-28T07:00:10.500000Z  INFO exactly::runtime: partitions assigned; starting their workers partitions=in/1
2026-11-28T07:00:12.000000Z DEBUG partition_worker{topic=in partition=1 transactional_id=app.in.1}: exactly::partition: going live next_offset=3 epoch=1
";

    fn events() -> Vec<Logged> {
        let mut events = parse_log("a", "in", LOG_A);
        events.extend(parse_log("b", "in", LOG_B));
        events
    }

    #[test]
    fn timestamps_are_seconds_since_the_epoch() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:01.5Z"), Some(1.5));
        assert_eq!(parse_timestamp("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(parse_timestamp("garbage"), None);
    }

    #[test]
    fn lines_become_events_of_the_topic_only() {
        let a = parse_log("a", "in", LOG_A);
        let kinds: Vec<(i32, Event)> = a.iter().map(|e| (e.partition, e.event.clone())).collect();
        assert_eq!(
            kinds,
            [
                (0, Event::Assigned),
                (1, Event::Assigned),
                (0, Event::Live),
                (1, Event::Live),
                (0, Event::Committed),
                (1, Event::Revoked),
                (0, Event::Committed),
            ]
        );
    }

    #[test]
    fn a_moved_partition_and_a_partition_that_kept_committing() {
        let events = events();
        let trigger = parse_timestamp("2026-11-28T07:00:09Z").unwrap();
        let settled = settled_at(&events, 2, trigger).expect("settled");
        assert_eq!(settled, parse_timestamp("2026-11-28T07:00:12Z").unwrap());
        let outcome = analyse(&events, trigger, settled);
        assert_eq!(outcome.moved, BTreeSet::from([1]));
        assert!(outcome.unmoved_stopped.is_empty());
        assert_eq!(outcome.commits_during, 1);
    }

    #[test]
    fn an_unmoved_partition_that_was_revoked_and_reassigned_counts_as_stopped() {
        let mut events = events();
        let at = |t: &str| parse_timestamp(t).unwrap();
        for (time, event) in [
            ("2026-11-28T07:00:10.100000Z", Event::Revoked),
            ("2026-11-28T07:00:10.600000Z", Event::Assigned),
            ("2026-11-28T07:00:11.500000Z", Event::Live),
        ] {
            events.push(Logged {
                at: at(time),
                instance: "a".into(),
                partition: 0,
                event,
            });
        }
        let outcome = analyse(
            &events,
            at("2026-11-28T07:00:09Z"),
            at("2026-11-28T07:00:12Z"),
        );
        assert_eq!(outcome.unmoved_stopped, BTreeSet::from([0]));
        assert_eq!(outcome.commits_during, 0);
    }

    #[test]
    fn an_unmoved_partition_that_recovered_counts_as_stopped() {
        let mut events = events();
        let at = |t: &str| parse_timestamp(t).unwrap();
        events.push(Logged {
            at: at("2026-11-28T07:00:10.800000Z"),
            instance: "a".into(),
            partition: 0,
            event: Event::Live,
        });
        let outcome = analyse(
            &events,
            at("2026-11-28T07:00:09Z"),
            at("2026-11-28T07:00:12Z"),
        );
        assert_eq!(outcome.unmoved_stopped, BTreeSet::from([0]));
    }

    #[test]
    fn an_unowned_or_recovering_partition_is_not_settled() {
        let events = parse_log("a", "in", LOG_A);
        // Partition 1 was revoked from a and nobody else has it.
        assert_eq!(settled_at(&events, 2, 0.0), None);
    }
}
