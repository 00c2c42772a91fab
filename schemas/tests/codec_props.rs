//! Property tests: every event round-trips; arbitrary or damaged bytes give typed errors, never a
//! panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use proptest::prelude::*;
use usbpt_schemas::{decode, encode, DecodeError, SCHEMA_VERSION};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_event_round_trips(env in common::any_envelope()) {
        let bytes = encode(&env).expect("encode");
        prop_assert_eq!(decode(&bytes).expect("decode"), env.clone());
        // JSON (what the API serves) round-trips too.
        let json = serde_json::to_string(&env).expect("json");
        prop_assert_eq!(serde_json::from_str::<usbpt_schemas::Envelope>(&json).expect("from json"), env);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn every_strict_prefix_is_truncated(env in common::any_envelope(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&env).expect("encode");
        let n = cut.index(bytes.len());
        let err = decode(&bytes[..n]).expect_err("a strict prefix cannot decode");
        prop_assert!(matches!(err, DecodeError::Truncated | DecodeError::Empty | DecodeError::Invalid(_) | DecodeError::UnknownVariant), "{err:?}");
    }

    #[test]
    fn trailing_bytes_are_refused(env in common::any_envelope(), extra in prop::collection::vec(any::<u8>(), 1..8)) {
        let mut bytes = encode(&env).expect("encode");
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes { count: extra.len() }));
    }

    #[test]
    fn flipped_bytes_never_panic(env in common::any_envelope(), at in any::<prop::sample::Index>(), xor in 1u8..) {
        let mut bytes = encode(&env).expect("encode");
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        let _ = decode(&bytes);
    }
}

#[test]
fn unknown_schema_version_is_named() {
    let mut bytes = encode(&common::sample_envelopes()[0]).expect("encode");
    assert_eq!(bytes[0], SCHEMA_VERSION as u8);
    bytes[0] = 9;
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::UnknownSchemaVersion { found: 9 })
    );
    assert!(decode(&bytes)
        .unwrap_err()
        .to_string()
        .contains("version 9"));
}

#[test]
fn unknown_variant_is_typed() {
    let env = &common::sample_envelopes()[0];
    let bytes = encode(env).expect("encode");
    // The body's variant index follows the fixed-size header fields; find it by re-encoding
    // the header alone and patch it to an index no build knows.
    let body_at = bytes.len() - postcard::to_allocvec(&env.body).expect("body").len();
    let mut patched = bytes.clone();
    patched[body_at] = 0x7f;
    assert_eq!(decode(&patched), Err(DecodeError::UnknownVariant));
}

#[test]
fn empty_and_garbage() {
    assert_eq!(decode(&[]), Err(DecodeError::Empty));
    assert!(decode(b"{\"hello\":\"world\"}").is_err());
}
