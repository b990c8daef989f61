//! The fault schedule of a chaos run: a pure function of the seed and the number of events.
//!
//! The schedule also tracks how many instances each service has after every event (scale out
//! and scale in keep it within [`MIN_INSTANCES`]..=[`MAX_INSTANCES`]), so every target is a
//! concrete instance name and the same seed always hits the same instances in the same order.
//! Only timing (how far the services got when an event lands) varies between runs.

use std::fmt;
use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Instances of each service at the start of a run.
pub const INITIAL_INSTANCES: usize = 3;
/// Scale in never goes below this.
pub const MIN_INSTANCES: usize = 2;
/// Scale out never goes above this.
pub const MAX_INSTANCES: usize = 5;

/// The three services of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// A: payment commands → ledger legs.
    Validate,
    /// B: balances.
    Ledger,
    /// C: running totals.
    Stats,
}

impl Service {
    /// All services, in chain order.
    pub const ALL: [Service; 3] = [Service::Validate, Service::Ledger, Service::Stats];

    /// The binary's name (also the prefix of its instance names).
    pub fn name(self) -> &'static str {
        match self {
            Service::Validate => "validate",
            Service::Ledger => "ledger",
            Service::Stats => "stats",
        }
    }

    /// The name of instance number `n` (1-based, never reused within a run).
    pub fn instance(self, n: usize) -> String {
        format!("{}-{n}", self.name())
    }
}

/// Requests a latency spike can slow down: the transaction protocol, fetches and the group
/// protocol.
pub const LATENCY_APIS: [ApiKey; 8] = [
    ApiKey::Produce,
    ApiKey::Fetch,
    ApiKey::EndTxn,
    ApiKey::AddPartitionsToTxn,
    ApiKey::TxnOffsetCommit,
    ApiKey::InitProducerId,
    ApiKey::Heartbeat,
    ApiKey::OffsetFetch,
];

/// One fault. Instance targets are instance names (see [`Service::instance`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then start it again at once.
    Kill {
        /// The instance.
        instance: String,
    },
    /// SIGSTOP for `pause` (longer than the session timeout, so the group moves its
    /// partitions on and it comes back a zombie), then SIGCONT.
    Zombie {
        /// The instance.
        instance: String,
    },
    /// SIGTERM (graceful: commit, final snapshot, leave the group), then start it again.
    CleanRestart {
        /// The instance.
        instance: String,
    },
    /// Start one more instance of a service.
    ScaleOut {
        /// The new instance.
        instance: String,
    },
    /// Stop (SIGTERM) one instance of a service for good.
    ScaleIn {
        /// The instance.
        instance: String,
    },
    /// The proxy closes every client connection.
    DropConnections,
    /// The proxy delays every request of one kind for a while.
    LatencySpike {
        /// The request kind.
        api: ApiKey,
        /// Added to each request.
        latency: Duration,
        /// How long the spike lasts.
        duration: Duration,
    },
    /// The proxy refuses every connection for a while (the broker keeps its data).
    BrokerOutage {
        /// How long.
        duration: Duration,
    },
    /// The proxy holds EndTxn responses (the transaction completed, the client learns late).
    DelayedEndTxn {
        /// How long each response is held.
        delay: Duration,
        /// How long the fault lasts.
        duration: Duration,
    },
    /// A Kafka node of a 3-node cluster is SIGKILLed, stays down for `down`, then starts
    /// again on the same ports with the same data.
    BrokerCrash {
        /// Which node.
        target: BrokerTarget,
        /// How long it stays down before the restart.
        down: Duration,
    },
}

/// Which Kafka node a [`Fault::BrokerCrash`] hits, resolved when it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerTarget {
    /// The leader of this partition of this service's input topic.
    LeaderOf {
        /// Whose input topic.
        service: Service,
        /// The partition.
        partition: i32,
    },
    /// The active KRaft controller.
    Controller,
}

impl fmt::Display for BrokerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerTarget::LeaderOf { service, partition } => write!(
                f,
                "the leader of {}'s input partition {partition}",
                service.name()
            ),
            BrokerTarget::Controller => write!(f, "the active controller"),
        }
    }
}

/// Which counter of the `CHAOS` line an event adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// SIGKILL + restart.
    Kill,
    /// SIGSTOP past the session timeout.
    Zombie,
    /// Clean restart, scale out, scale in.
    Rebalance,
    /// Everything the proxy injects.
    NetFault,
    /// A Kafka node crashed and restarted.
    BrokerCrash,
}

impl Fault {
    /// The counter this fault belongs to.
    pub fn category(&self) -> Category {
        match self {
            Fault::Kill { .. } => Category::Kill,
            Fault::Zombie { .. } => Category::Zombie,
            Fault::CleanRestart { .. } | Fault::ScaleOut { .. } | Fault::ScaleIn { .. } => {
                Category::Rebalance
            }
            Fault::DropConnections
            | Fault::LatencySpike { .. }
            | Fault::BrokerOutage { .. }
            | Fault::DelayedEndTxn { .. } => Category::NetFault,
            Fault::BrokerCrash { .. } => Category::BrokerCrash,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill { instance } => write!(f, "SIGKILL {instance} and restart it"),
            Fault::Zombie { instance } => write!(
                f,
                "SIGSTOP {instance} past the session timeout, then SIGCONT"
            ),
            Fault::CleanRestart { instance } => write!(f, "SIGTERM {instance} and restart it"),
            Fault::ScaleOut { instance } => write!(f, "scale out: start {instance}"),
            Fault::ScaleIn { instance } => write!(f, "scale in: stop {instance}"),
            Fault::DropConnections => write!(f, "drop every connection"),
            Fault::LatencySpike {
                api,
                latency,
                duration,
            } => {
                write!(f, "{latency:?} latency on {api:?} for {duration:?}")
            }
            Fault::BrokerOutage { duration } => write!(f, "broker outage for {duration:?}"),
            Fault::DelayedEndTxn { delay, duration } => {
                write!(f, "delay EndTxn responses by {delay:?} for {duration:?}")
            }
            Fault::BrokerCrash { target, down } => {
                write!(f, "take down {target}, restart it after {down:?}")
            }
        }
    }
}

/// A fault and the pause before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledFault {
    /// Quiet time before the fault is applied.
    pub gap: Duration,
    /// The fault.
    pub fault: Fault,
}

/// Counts per category, for the `CHAOS` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every event.
    pub events: usize,
    /// [`Category::Kill`].
    pub kills: usize,
    /// [`Category::Zombie`].
    pub zombies: usize,
    /// [`Category::Rebalance`].
    pub rebalances: usize,
    /// [`Category::NetFault`].
    pub net_faults: usize,
    /// [`Category::BrokerCrash`].
    pub broker_crashes: usize,
}

impl Counts {
    /// Counts the faults of a schedule.
    pub fn of(schedule: &[ScheduledFault]) -> Counts {
        let mut counts = Counts::default();
        for event in schedule {
            counts.events += 1;
            match event.fault.category() {
                Category::Kill => counts.kills += 1,
                Category::Zombie => counts.zombies += 1,
                Category::Rebalance => counts.rebalances += 1,
                Category::NetFault => counts.net_faults += 1,
                Category::BrokerCrash => counts.broker_crashes += 1,
            }
        }
        counts
    }
}

/// The live instances of every service, as the schedule tracks them.
#[derive(Debug, Clone)]
struct Fleet {
    /// Live instance names per service (in [`Service::ALL`] order).
    live: [Vec<String>; 3],
    /// Next instance number per service.
    next: [usize; 3],
}

impl Fleet {
    fn new() -> Self {
        let live = Service::ALL.map(|s| (1..=INITIAL_INSTANCES).map(|n| s.instance(n)).collect());
        Fleet {
            live,
            next: [INITIAL_INSTANCES + 1; 3],
        }
    }
}

/// Relative weights of the fault kinds, in the order of [`schedule`]'s match.
const WEIGHTS: [u32; 10] = [
    18, // kill
    8,  // zombie
    10, // clean restart
    6,  // scale out
    6,  // scale in
    14, // drop connections
    14, // latency spike
    10, // broker outage
    14, // delayed EndTxn
    6,  // broker crash
];

/// The index of the broker crash in [`WEIGHTS`].
const BROKER_CRASH: usize = 9;

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// The schedule of `events` faults for `seed`: each preceded by a gap of 1–3 s. Without
/// `broker_crashes` (a single Kafka node) the schedule has no [`Fault::BrokerCrash`]: a lone
/// Kafka node that goes down loses transaction state it acknowledged (see the README's
/// chaos section), and no client can keep exactly-once over a broker that forgets.
pub fn schedule(seed: u64, events: usize, broker_crashes: bool) -> Vec<ScheduledFault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fleet = Fleet::new();
    let mut weights = WEIGHTS;
    if !broker_crashes {
        weights[BROKER_CRASH] = 0;
    }
    let total: u32 = weights.iter().sum();
    let mut out = Vec::with_capacity(events);
    for _ in 0..events {
        let gap = ms(&mut rng, 1_000, 3_000);
        let s = rng.random_range(0..Service::ALL.len());
        let service = Service::ALL[s];
        let mut roll = rng.random_range(0..total);
        let mut kind = 0;
        while roll >= weights[kind] {
            roll -= weights[kind];
            kind += 1;
        }
        // Scale out at the maximum becomes scale in, and the other way round.
        if kind == 3 && fleet.live[s].len() >= MAX_INSTANCES {
            kind = 4;
        } else if kind == 4 && fleet.live[s].len() <= MIN_INSTANCES {
            kind = 3;
        }
        let pick = rng.random_range(0..fleet.live[s].len());
        let target = fleet.live[s][pick].clone();
        let fault = match kind {
            0 => Fault::Kill { instance: target },
            1 => Fault::Zombie { instance: target },
            2 => Fault::CleanRestart { instance: target },
            3 => {
                let instance = service.instance(fleet.next[s]);
                fleet.next[s] += 1;
                fleet.live[s].push(instance.clone());
                Fault::ScaleOut { instance }
            }
            4 => {
                fleet.live[s].remove(pick);
                Fault::ScaleIn { instance: target }
            }
            5 => Fault::DropConnections,
            6 => Fault::LatencySpike {
                api: LATENCY_APIS[rng.random_range(0..LATENCY_APIS.len())],
                latency: ms(&mut rng, 100, 1_500),
                duration: ms(&mut rng, 1_000, 4_000),
            },
            7 => Fault::BrokerOutage {
                duration: ms(&mut rng, 1_000, 4_000),
            },
            8 => Fault::DelayedEndTxn {
                delay: ms(&mut rng, 500, 5_000),
                duration: ms(&mut rng, 2_000, 5_000),
            },
            _ => Fault::BrokerCrash {
                target: if rng.random_bool(0.5) {
                    BrokerTarget::LeaderOf {
                        service,
                        partition: rng.random_range(0..8),
                    }
                } else {
                    BrokerTarget::Controller
                },
                down: ms(&mut rng, 500, 5_000),
            },
        };
        out.push(ScheduledFault { gap, fault });
    }
    out
}

/// Which service an instance name belongs to.
pub fn service_of(instance: &str) -> Option<Service> {
    let (name, n) = instance.rsplit_once('-')?;
    n.parse::<usize>().ok()?;
    Service::ALL.into_iter().find(|s| s.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_and_different_seeds_differ() {
        assert_eq!(schedule(7, 200, true), schedule(7, 200, true));
        assert_ne!(schedule(7, 200, true), schedule(8, 200, true));
        // A shorter run is a prefix of a longer one with the same seed.
        assert_eq!(schedule(7, 30, true)[..], schedule(7, 200, true)[..30]);
        assert_eq!(schedule(7, 30, false)[..], schedule(7, 200, false)[..30]);
    }

    #[test]
    fn a_single_node_schedule_has_no_broker_crash() {
        let s = schedule(1, 400, false);
        assert_eq!(Counts::of(&s).broker_crashes, 0);
        assert_eq!(Counts::of(&s).events, 400);
    }

    #[test]
    fn every_kind_appears_and_counts_add_up() {
        let s = schedule(1, 400, true);
        let c = Counts::of(&s);
        assert_eq!(c.events, 400);
        assert_eq!(
            c.kills + c.zombies + c.rebalances + c.net_faults + c.broker_crashes,
            400
        );
        let has = |f: fn(&Fault) -> bool| s.iter().any(|e| f(&e.fault));
        assert!(has(|f| matches!(f, Fault::Kill { .. })));
        assert!(has(|f| matches!(f, Fault::Zombie { .. })));
        assert!(has(|f| matches!(f, Fault::CleanRestart { .. })));
        assert!(has(|f| matches!(f, Fault::ScaleOut { .. })));
        assert!(has(|f| matches!(f, Fault::ScaleIn { .. })));
        assert!(has(|f| matches!(f, Fault::DropConnections)));
        assert!(has(|f| matches!(f, Fault::LatencySpike { .. })));
        assert!(has(|f| matches!(f, Fault::BrokerOutage { .. })));
        assert!(has(|f| matches!(f, Fault::DelayedEndTxn { .. })));
        let crash = |target: fn(&BrokerTarget) -> bool| {
            s.iter()
                .any(|e| matches!(&e.fault, Fault::BrokerCrash { target: t, .. } if target(t)))
        };
        assert!(crash(|t| matches!(t, BrokerTarget::Controller)));
        assert!(crash(|t| matches!(t, BrokerTarget::LeaderOf { .. })));
        for e in &s {
            assert!((1_000..=3_000).contains(&(e.gap.as_millis() as u64)));
        }
    }

    #[test]
    fn targets_are_live_instances_within_bounds() {
        let mut live: Vec<Vec<String>> = Service::ALL
            .iter()
            .map(|s| (1..=INITIAL_INSTANCES).map(|n| s.instance(n)).collect())
            .collect();
        for e in schedule(3, 500, true) {
            let index = |i: &str| {
                let s = service_of(i).unwrap();
                Service::ALL.iter().position(|x| *x == s).unwrap()
            };
            match &e.fault {
                Fault::Kill { instance }
                | Fault::Zombie { instance }
                | Fault::CleanRestart { instance } => {
                    assert!(live[index(instance)].contains(instance), "{instance}");
                }
                Fault::ScaleOut { instance } => {
                    let l = &mut live[index(instance)];
                    assert!(!l.contains(instance));
                    l.push(instance.clone());
                    assert!(l.len() <= MAX_INSTANCES);
                }
                Fault::ScaleIn { instance } => {
                    let l = &mut live[index(instance)];
                    let at = l.iter().position(|i| i == instance).unwrap();
                    l.remove(at);
                    assert!(l.len() >= MIN_INSTANCES);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn instance_names_round_trip() {
        assert_eq!(service_of("ledger-12"), Some(Service::Ledger));
        assert_eq!(service_of("stats-1"), Some(Service::Stats));
        assert_eq!(service_of("ledger"), None);
        assert_eq!(service_of("other-1"), None);
    }
}
