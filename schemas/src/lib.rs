//! The contracts every usbpt component shares: identity types validated at construction, typed
//! events in a versioned envelope, commands, the one module that builds subject names, and the
//! postcard codec.
//!
//! Wire rule (postcard is not self-describing): never reorder or remove enum variants or struct
//! fields; add variants at the end. `tests/golden.rs` guards every variant with checked-in bytes.

pub mod codec;
pub mod commands;
pub mod envelope;
pub mod events;
pub mod fingerprint;
pub mod heartbeat;
pub mod ids;
pub mod label;
pub mod origin;
pub mod subjects;
pub mod text;
pub mod time;

pub use codec::{decode, encode, DecodeError, Sealed};
pub use envelope::{Envelope, SCHEMA_VERSION, SCHEMA_VERSION_V1};
pub use events::*;
pub use ids::*;
pub use origin::{Origin, Via};
pub use time::Timestamp;
