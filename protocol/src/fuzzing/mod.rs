//! Entry points for the fuzz targets in `fuzz/` (and the replay test that feeds them every
//! committed corpus and regression file on stable). Each panics on a broken property.
//!
//! - [`frames`]: frames from arbitrary bytes, and the targets over the frame codec;
//! - [`ops`]: one session under arbitrary inbound frames, commands and timeouts;
//! - [`pair`]: two sessions through the pair harness with arbitrary commands and faults.

mod frames;
mod ops;
mod pair;

pub use frames::{
    arbitrary_frame, arbitrary_frame_with, codec_chunks, frame_decode, frame_roundtrip,
};
pub use ops::session_ops;
pub use pair::session_pair;
