//! The examples run end to end, each against a local Kafka it starts itself, in one test
//! binary so that the two test threads run them side by side: the demo, the fraud detector's
//! check, and (ignored, manual) the benchmark's Quix Streams peer.

mod demo;
mod fraud;
mod quix_peer;
