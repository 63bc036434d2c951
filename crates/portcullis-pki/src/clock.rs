//! Wall-clock time for certificate validity, injectable so tests can control it.

use std::time::SystemTime;

/// The source of the current wall-clock time. Certificate validity is wall-clock time, while
/// the rotator sleeps on tokio's clock, so [`TokioClock`] ties the two together in tests.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's clock from the moment it was created, so that
/// `tokio::time::pause` and `advance` move certificate time too.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall_origin: SystemTime,
    tokio_origin: tokio::time::Instant,
}

impl TokioClock {
    /// Starts the clock at `wall_origin`.
    pub fn starting_at(wall_origin: SystemTime) -> Self {
        TokioClock { wall_origin, tokio_origin: tokio::time::Instant::now() }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall_origin + self.tokio_origin.elapsed()
    }
}
