//! A device's descriptor fingerprint: SHA-256 of what the device itself reports, the rule of
//! USBGuard's `hash` attribute (docs/identity.md, "Descriptor fingerprint"). The agent computes
//! it; everyone else only compares and prints it.
//!
//! On the wire (postcard) it is the 32 raw bytes; in JSON and in text it is USBGuard's encoding,
//! standard base64 with padding (44 characters), so a fingerprint can be pasted into a USBGuard
//! rule (`hash "…"`) and back.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// SHA-256 of `product ‖ idVendor ‖ idProduct ‖ serial ‖ descriptors`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("fingerprint {0:?} is not 44 characters of standard base64 encoding 32 bytes")]
pub struct FingerprintError(pub String);

impl Fingerprint {
    /// Standard base64 with padding, as USBGuard prints a device's `hash`.
    pub fn to_base64(&self) -> String {
        let mut out = String::with_capacity(44);
        for chunk in self.0.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, FingerprintError> {
        let bad = || FingerprintError(s.chars().take(64).collect());
        let bytes = s.as_bytes();
        if bytes.len() != 44 || bytes[43] != b'=' || bytes[42] == b'=' {
            return Err(bad());
        }
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut out = Vec::with_capacity(33);
        for &c in &bytes[..43] {
            let v = ALPHABET.iter().position(|&a| a == c).ok_or_else(bad)? as u32;
            bits = (bits << 6) | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        // 43 symbols carry 258 bits: 32 bytes and 2 bits that must be zero.
        if out.len() != 32 || bits != 0 {
            return Err(bad());
        }
        let mut fp = [0u8; 32];
        fp.copy_from_slice(&out);
        Ok(Fingerprint(fp))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_base64())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(Fingerprint)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_encoding_and_parses_back() {
        // SHA-256 of the empty string, as `printf '' | sha256sum | xxd -r -p | base64` prints.
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let mut b = [0u8; 32];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or_default();
        }
        let fp = Fingerprint(b);
        assert_eq!(
            fp.to_base64(),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(fp.to_base64().parse::<Fingerprint>(), Ok(fp));
        for bad in [
            "",
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuF*=",
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }
}
