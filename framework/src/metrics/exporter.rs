//! The Prometheus endpoint: `GET /metrics` on [`AppConfig::metrics_addr`], in the OpenMetrics
//! text format, served on the app's tokio runtime. A scrape encodes the current values (a few
//! series per assigned partition); nothing is computed between scrapes.
//!
//! [`AppConfig::metrics_addr`]: crate::AppConfig::metrics_addr

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::Metrics;
use crate::error::Error;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound (not yet serving) metrics listener: binding happens when the app is created, so a
/// taken port fails `App::new`, not a running app.
#[derive(Debug)]
pub(crate) struct MetricsEndpoint {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl MetricsEndpoint {
    pub(crate) fn bind(addr: SocketAddr) -> Result<Self, Error> {
        let io = |source| {
            Error::Io {
            context: format!(
                "binding the metrics endpoint to {addr} (AppConfig::metrics_addr / EXACTLY_METRICS_ADDR): choose a free address, or port 0 for any"
            ),
            source,
        }
        };
        let listener = std::net::TcpListener::bind(addr).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        Ok(MetricsEndpoint { listener, addr })
    }

    /// The address it listens on (the real port when 0 was asked for).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes until the returned task is aborted.
    pub(crate) fn serve(self, metrics: Metrics) -> Result<tokio::task::JoinHandle<()>, Error> {
        let listener =
            tokio::net::TcpListener::from_std(self.listener).map_err(|source| Error::Io {
                context: format!("serving the metrics endpoint on {}", self.addr),
                source,
            })?;
        tracing::info!(addr = %self.addr, "metrics endpoint listening (GET /metrics)");
        Ok(tokio::spawn(accept_loop(listener, metrics)))
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, metrics: Metrics) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: pass; a scrape will retry.
                tracing::warn!(%error, "metrics endpoint: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%error, "metrics endpoint: connection ended with an error");
            }
        });
    }
}

fn respond<B>(request: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let found = request.method() == Method::GET && matches!(request.uri().path(), "/metrics" | "/");
    let (status, content_type, body) = if found {
        match encode(metrics) {
            Ok(text) => (StatusCode::OK, CONTENT_TYPE, text),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "encoding the metrics failed\n".to_owned(),
            ),
        }
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at GET /metrics\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Every metric of the app in the OpenMetrics text format.
pub(crate) fn encode(metrics: &Metrics) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry(metrics))?;
    Ok(text)
}

fn registry(metrics: &Metrics) -> Registry {
    let mut registry = Registry::with_prefix("exactly");
    let f = &metrics.families;
    registry.register(
        "partition_assigned",
        "1 for each input partition assigned to this instance",
        f.assigned.clone(),
    );
    registry.register(
        "partition_records",
        "Input records processed live, per partition (rate() gives records/s)",
        f.records.clone(),
    );
    registry.register(
        "partition_next_offset",
        "Next input offset to process, as of the partition's last commit",
        f.next_offset.clone(),
    );
    registry.register(
        "partition_input_end",
        "The input partition's end offset as the consumer last saw it",
        f.input_end.clone(),
    );
    registry.register(
        "partition_lag_records",
        "Input records not yet processed and committed: input_end - next_offset",
        f.lag.clone(),
    );
    registry.register(
        "partition_recovering",
        "1 while the partition's state is being recovered",
        f.recovering.clone(),
    );
    registry.register("recovery_done", "Progress of the running recovery step: chunks fetched (fetch_full_snapshot) or offsets replayed (replay)", f.recovery_done.clone());
    registry.register(
        "recovery_total",
        "Size of the running recovery step, in the unit of recovery_done",
        f.recovery_total.clone(),
    );
    registry.register(
        "recovery_eta_seconds",
        "Estimated time left of the running recovery step",
        f.recovery_eta.clone(),
    );
    registry.register(
        "recovery_snapshot_bytes_loaded",
        "Bytes of full snapshot fetched by the running (or last) recovery",
        f.snapshot_bytes_loaded.clone(),
    );
    registry.register(
        "partition_full_snapshot_bytes",
        "Serialized state size of the partition's last full snapshot",
        f.full_snapshot_bytes.clone(),
    );
    registry.register(
        "transactions_aborted_by_cause",
        "Aborted transactions by cause: error, failed_commit, hung_call, coordinator_timeout",
        f.aborts.clone(),
    );
    registry.register(
        "transaction_commit_seconds",
        "Time to commit a transaction: flush, send offsets, commit",
        f.commit_seconds.clone(),
    );
    registry.register(
        "full_snapshot_seconds",
        "Time to write a full snapshot (serialization and chunks)",
        f.full_snapshot_seconds.clone(),
    );
    registry.register_collector(Box::new(AppCounters(metrics.clone())));
    registry
}

/// The app-wide counters of [`Metrics`], read at each scrape.
#[derive(Debug)]
struct AppCounters(Metrics);

impl Collector for AppCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        let counters: [(&str, &str, u64); 20] = [
            (
                "records_processed",
                "Input records processed live (all partitions)",
                s.records_processed,
            ),
            (
                "records_skipped",
                "Failed records skipped under ErrorPolicy::Skip",
                s.records_skipped,
            ),
            (
                "records_dead_lettered",
                "Failed records written to the dead-letter topic",
                s.records_dead_lettered,
            ),
            ("timers_fired", "Stream-time timers fired", s.timers_fired),
            (
                "wall_clock_ticks",
                "Wall-clock ticks fired (Processor::on_wall_clock)",
                s.wall_clock_ticks,
            ),
            (
                "record_errors",
                "Records that failed to decode or to process",
                s.record_errors,
            ),
            (
                "output_records",
                "Records produced to output topics",
                s.output_records,
            ),
            (
                "transactions_committed",
                "Committed transactions",
                s.transactions_committed,
            ),
            (
                "transactions_aborted",
                "Aborted transactions (all causes)",
                s.transactions_aborted,
            ),
            (
                "full_snapshots_written",
                "Full snapshots committed",
                s.full_snapshots_written,
            ),
            (
                "full_snapshot_bytes",
                "Bytes of serialized state written in full snapshots",
                s.full_snapshot_bytes_total,
            ),
            (
                "snapshot_trims",
                "Snapshot partitions trimmed below a full snapshot",
                s.snapshot_trims,
            ),
            (
                "snapshot_trim_failures",
                "Snapshot trims that failed",
                s.snapshot_trim_failures,
            ),
            ("recoveries", "Partition recoveries finished", s.recoveries),
            (
                "recoveries_from_full_snapshot",
                "Recoveries that started from a full snapshot",
                s.recoveries_from_full_snapshot,
            ),
            (
                "fresh_starts",
                "Partitions started with nothing to recover",
                s.fresh_starts,
            ),
            (
                "replayed_records",
                "Input records replayed by recoveries",
                s.replayed_records_total,
            ),
            (
                "partition_assignments",
                "Partition assignments since start",
                s.partition_assignments_total,
            ),
            (
                "partitions_fenced",
                "Partitions dropped because another instance fenced this one",
                s.partitions_fenced,
            ),
            (
                "partitions_failed",
                "Partitions stopped by an error",
                s.partitions_failed,
            ),
        ];
        for (name, help, value) in counters {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let gauges: [(&str, &str, f64); 7] = [
            (
                "max_buffered_bytes",
                "Most input bytes one partition had buffered (a high-water mark)",
                s.max_buffered_bytes as f64,
            ),
            (
                "partitions_assigned",
                "Input partitions assigned to this instance",
                s.partitions_assigned as f64,
            ),
            (
                "stuck_input_partitions",
                "Input partitions stuck behind a transaction left open upstream",
                s.stuck_input_partitions as f64,
            ),
            (
                "last_full_snapshot_bytes",
                "Serialized size of the latest full snapshot",
                s.last_full_snapshot_bytes as f64,
            ),
            (
                "last_recovery_seconds",
                "Duration of the latest recovery",
                s.last_recovery_time.as_secs_f64(),
            ),
            (
                "max_recovery_seconds",
                "Longest recovery",
                s.max_recovery_time.as_secs_f64(),
            ),
            (
                "last_recovery_replayed_records",
                "Records replayed by the latest recovery",
                s.last_recovery_replayed_records as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}
