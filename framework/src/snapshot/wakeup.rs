//! Waiting for a transactional producer's delivery reports without spinning.
//!
//! A commit waits until every record of its transaction is acknowledged. rdkafka 0.39 offers
//! no wait that returns when a report arrives (`poll(d)` always runs until `d`), so the
//! worker used to look every 200 µs: with 24 partitions committing at once that was tens of
//! thousands of wake-ups a second, most of a core on a 2-core machine, taken from the broker
//! the commits wait for. Instead librdkafka writes to an eventfd whenever a report is queued
//! on the producer's empty main queue (`rd_kafka_queue_io_event_enable`), and the worker
//! sleeps in `poll(2)` on it.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use rdkafka::bindings as rdsys;
use rdkafka::client::Client;
use rdkafka::ClientContext;

/// Longest a wait lasts without a signal. librdkafka signals only when a report lands on an
/// empty queue, and an event of another kind (an error) served in between can leave reports
/// queued unsignalled: a bounded wait makes that cost at most this long, never a hang.
const LONGEST_WAIT: Duration = Duration::from_millis(5);

/// An eventfd librdkafka writes to when a delivery report is queued for the producer.
///
/// Kept in the producer's context, which rdkafka drops only after `rd_kafka_destroy` has
/// joined the threads that write to the fd, so the fd is never closed under a writer.
#[derive(Debug)]
pub(crate) struct DeliveryWakeup {
    fd: EventFd,
}

impl DeliveryWakeup {
    /// Makes librdkafka signal a new eventfd when an event is queued on `client`'s main queue
    /// (where a producer's delivery reports go). `None` when no eventfd can be made: waits
    /// then fall back to looking every 200 µs.
    pub(crate) fn attach<C: ClientContext>(client: &Client<C>) -> Option<Self> {
        let fd = match EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC) {
            Ok(fd) => fd,
            Err(error) => {
                tracing::warn!(%error, "no eventfd for delivery reports; commits wait by polling");
                return None;
            }
        };
        // An eventfd takes 8-byte writes of a counter; librdkafka copies the payload.
        let payload = 1u64.to_ne_bytes();
        // SAFETY: `client` is a live handle. The queue reference taken here is released at
        // once; the io event stays set on the queue itself. librdkafka writes to the fd only
        // while the client lives, and the fd outlives it (see the type's docs).
        unsafe {
            let queue = rdsys::rd_kafka_queue_get_main(client.native_ptr());
            if queue.is_null() {
                return None;
            }
            rdsys::rd_kafka_queue_io_event_enable(
                queue,
                fd.as_fd().as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
            );
            rdsys::rd_kafka_queue_destroy(queue);
        }
        Some(DeliveryWakeup { fd })
    }

    /// Sleeps until librdkafka signals an event or at most [`LONGEST_WAIT`]; clears the
    /// signal.
    pub(crate) fn wait(&self) {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(LONGEST_WAIT).unwrap_or(PollTimeout::ZERO);
        // An interrupted or failed poll only ends this wait early; the caller looks again.
        if let Ok(ready) = poll(&mut fds, timeout) {
            if ready > 0 {
                // Non-blocking: resets the counter; a signal that raced in is read next time.
                let _ = self.fd.read();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use std::time::Instant;

    fn unattached() -> DeliveryWakeup {
        DeliveryWakeup {
            fd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .expect("eventfd"),
        }
    }

    #[test]
    fn a_wait_without_a_signal_ends_at_its_bound() {
        // Not attached to a client: nothing can signal it.
        let wakeup = unattached();
        let started = Instant::now();
        wakeup.wait();
        let waited = started.elapsed();
        assert!(
            waited >= LONGEST_WAIT - Duration::from_millis(1),
            "{waited:?}"
        );
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }

    #[test]
    fn a_wait_clears_the_signal_that_ended_it() {
        let wakeup = unattached();
        wakeup.fd.write(1).expect("signal");
        wakeup.wait();
        // Read by the wait: nothing is left to read (non-blocking: EAGAIN).
        assert!(wakeup.fd.read().is_err());
    }

    /// Serves events until the queue is empty (a zero-timeout poll serves at most one; the
    /// in-flight count includes queued events).
    fn serve_everything_queued(producer: &BaseProducer) {
        loop {
            let before = producer.in_flight_count();
            producer.poll(Duration::ZERO);
            if producer.in_flight_count() == before {
                return;
            }
        }
    }

    #[test]
    fn a_queued_delivery_report_ends_the_wait() {
        // No broker: the record fails at once (message.timeout.ms), and its report is queued.
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.timeout.ms", "1")
            .create()
            .expect("producer");
        let wakeup = DeliveryWakeup::attach(producer.client()).expect("eventfd");
        // librdkafka signals only when the queue goes from empty to non-empty: a connection
        // error queued before `attach` would keep it non-empty, and unsignalled, until served.
        serve_everything_queued(&producer);
        let _ = wakeup.fd.read();
        producer
            .send(BaseRecord::<(), str>::to("t").payload("x"))
            .expect("queued");
        // The producer is served only after a signal, so the report is seen only if one came.
        let deadline = Instant::now() + Duration::from_secs(10);
        while producer.in_flight_count() > 0 && Instant::now() < deadline {
            let mut fds = [PollFd::new(wakeup.fd.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(100u16)).expect("poll") > 0 {
                let _ = wakeup.fd.read();
                serve_everything_queued(&producer);
            }
        }
        assert_eq!(
            producer.in_flight_count(),
            0,
            "no signal for the queued delivery report"
        );
    }
}
