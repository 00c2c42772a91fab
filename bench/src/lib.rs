//! `usbpt bench`: each usbpt figure is measured in the same run as the raw limit of the engine
//! underneath it (JetStream publish and read, redb batched inserts, the codec), and printed as a
//! ratio, so a reader sees how much of the engine usbpt leaves on the table.

pub mod codec;
pub mod raw;
pub mod report;
pub mod stats;

pub use report::{Figure, Report};
