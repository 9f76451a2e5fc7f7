//! Data plane sampling for `/metrics`, as its own task: once a second it asks the backend
//! network which data plane runs and for its counters (a quick map read there), so that a
//! scrape never waits on the backend.

use std::sync::RwLock;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::backend::network::StatsRequest;
use crate::backend::DataplaneSample;

/// How often the data plane counters behind `/metrics` are refreshed.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// The latest sample, read by `/metrics` (None: no udp data plane, or none taken yet).
#[derive(Default)]
pub struct LatestSample(RwLock<Option<DataplaneSample>>);

impl LatestSample {
    pub fn get(&self) -> Option<DataplaneSample> {
        self.0.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn set(&self, sample: Option<DataplaneSample>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = sample;
    }
}

/// Samples until the backend network goes away.
pub async fn run(backend: mpsc::Sender<StatsRequest>, latest: std::sync::Arc<LatestSample>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        tick.tick().await;
        let (reply, answer) = oneshot::channel();
        if backend.send(reply).await.is_err() {
            return;
        }
        let Ok(sample) = answer.await else { return };
        latest.set(sample);
    }
}
