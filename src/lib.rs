//! edgesight: camera and file streams in, image classifications out on MQTT.
//!
//! Data flows one way: [`source`] (GStreamer pipelines → RGB [`preprocess::Frame`]s) →
//! [`engine`] (sampling, preprocessing, the [`model`] backend) → [`publish`] (MQTT topics and
//! payloads). [`config`] holds the typed settings every stage reads; [`service`] ties the
//! stages together for `edgesight run` and shuts them down in order.

pub mod backoff;
pub mod classify;
pub mod config;
pub mod dataset;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod publish;
pub mod service;
pub mod source;
pub mod train;
